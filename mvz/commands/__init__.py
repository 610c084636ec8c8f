"""One module per CLI command; each exposes ``register(app)`` and keeps heavy imports inside."""

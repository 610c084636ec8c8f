"""``mvz serve``: the HTTP service over any mvz backend, with dynamic request batching.

batching.py  the bounded queue and the rule that packs compatible requests (no HTTP, no model)
runner.py    load the model/engines once, run one batch through the pipeline (one worker thread)
schema.py    the request body and the checks that need the server's limits (errors name the field)
service.py   the one-process service: queue -> worker thread, failures per batch, readiness
app.py       the FastAPI routes: /v1/generate, /healthz, /metrics
server.py    uvicorn with a graceful SIGTERM drain
fake.py      a model-free runner (HTTP-layer tests, fuzzing)
ray_app.py   the same API as a Ray Serve deployment (one replica per GPU, ``@serve.batch``)
"""

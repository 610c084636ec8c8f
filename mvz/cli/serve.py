"""``mvz serve``: an HTTP service that batches generation requests (one GPU, or a Ray Serve cluster)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        model: str = typer.Option("sdxl-lcm", "--model", "-m", help="Preset (tiny, sdxl-lcm) or a diffusers folder / HF repo id."),
        random_weights: bool = typer.Option(False, "--random-weights", help="Full-size architecture, random weights (no download)."),
        lora: Path = typer.Option(None, help="A MVC-ZigAL LoRA file (PEFT layout) to apply."),
        lora_scale: float = typer.Option(1.0, help="LoRA scale (torch backends: requests may override it)."),
        backend: str = typer.Option("torch", help="torch, torch-compile, torch-cudagraph, onnxruntime or tensorrt."),
        engines: Path = typer.Option(None, help="Export/engine folder for the onnxruntime and tensorrt backends."),
        host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 for every interface)."),
        port: int = typer.Option(8000, help="TCP port."),
        device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
        dtype: str = typer.Option("auto", help="fp16, bf16, fp32 or auto (fp16 on CUDA, fp32 on CPU)."),
        max_batch: int = typer.Option(4, help="Most prompts packed into one UNet call per step."),
        batch_window_ms: float = typer.Option(20.0, help="How long the first request of a batch waits for company."),
        max_queue: int = typer.Option(64, help="Waiting requests beyond which the server answers 429."),
        timeout_s: float = typer.Option(300.0, help="Per-request timeout (504 after it)."),
        warmup: bool = typer.Option(True, "--warmup/--no-warmup", help="Run one batch before /healthz says ready."),
        ui: bool = typer.Option(None, "--ui/--no-ui", help="The web page at / (default: on when the `ui` extra is installed)."),
        root_path: str = typer.Option("", help="Path prefix a reverse proxy serves this under (e.g. /mvz)."),
        ray: bool = typer.Option(False, "--ray", help="Run as a Ray Serve deployment (one replica per GPU)."),
        replicas: int = typer.Option(None, help="--ray: replicas (default: one per visible GPU, else 1)."),
    ) -> None:
        """Serve text-to-multiview generation over HTTP with dynamic batching (FastAPI + uvicorn)."""
        import sys

        from serve.runner import RunnerConfig
        from serve.server import ServeOptions, run_server, ui_available

        cfg = RunnerConfig(model=model, lora=lora, lora_scale=lora_scale, backend=backend, engines=engines,
                           device=device, dtype=dtype, max_batch=max_batch, random_weights=random_weights)
        opts = ServeOptions(host=host, port=port, max_batch=max_batch, batch_window_ms=batch_window_ms,
                            max_queue=max_queue, timeout_s=timeout_s, warmup=warmup,
                            ui=ui_available() and not ray if ui is None else ui, root_path=root_path)
        if ray:
            from serve.ray_app import run_ray

            sys.exit(run_ray(cfg, opts, replicas))
        sys.exit(run_server(cfg, opts))

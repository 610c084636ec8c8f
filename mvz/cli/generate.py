"""``mvz generate``: prompts -> a 1xV grid of consistent views (plus optional per-view PNGs and a sidecar)."""

from __future__ import annotations

from pathlib import Path

import typer

from mvz.spec import DEFAULT_GUIDANCE, DEFAULT_SEED, DEFAULT_STEPS, MAX_STEPS


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate(
        prompt: str = typer.Argument(None, help="The prompt. Omit it when using --prompts."),
        prompts_file: Path = typer.Option(None, "--prompts", help="A text file with one prompt per line (- reads standard input)."),
        model: str = typer.Option("sdxl-lcm", "--model", "-m", help="Preset (tiny, sdxl-lcm) or an assembled model folder."),
        base_model: str = typer.Option(None, help="Override: text encoders/tokenizers (path or cached HF repo id)."),
        unet_model: str = typer.Option(None, help="Override: the UNet (path or cached HF repo id)."),
        vae_model: str = typer.Option(None, help="Override: the VAE (path or cached HF repo id)."),
        adapter: str = typer.Option(None, help="Override: mvadapter_t2mv_sdxl.safetensors (file, folder or repo id)."),
        random_weights: bool = typer.Option(False, "--random-weights", help="Full-size architecture with random weights (no download)."),
        lora: Path = typer.Option(None, help="A MVC-ZigAL LoRA file (PEFT layout) or a folder holding one."),
        lora_scale: float = typer.Option(1.0, help="LoRA scale."),
        seed: int = typer.Option(DEFAULT_SEED, help="Seed of the first prompt (0..2^63-1); prompt i uses seed + i."),
        steps: int = typer.Option(DEFAULT_STEPS, help=f"LCM steps (1-{MAX_STEPS}; the paper uses 8 or 4)."),
        guidance: float = typer.Option(DEFAULT_GUIDANCE, help="Guidance scale (enters as the LCM w-embedding w = g - 1)."),
        views: int = typer.Option(None, help="Number of views (default 6, or the number of --azimuths)."),
        azimuths: str = typer.Option(None, help="Comma-separated azimuths in degrees (default 0,45,90,180,270,315)."),
        elevation: float = typer.Option(0.0, help="Camera elevation in degrees, -90..90 (the adapter was trained at 0)."),
        resolution: int = typer.Option(None, help="Image side in pixels (default: the model's, 768 for sdxl-lcm)."),
        zmv: bool = typer.Option(False, "--zmv", help="ZMV-Sampling: first-step zigzag (10 UNet calls instead of 8)."),
        zmv_steps: int = typer.Option(1, help="Steps that zigzag when --zmv is on."),
        batch_size: int = typer.Option(1, help="Prompts per UNet call (all their views go in one call)."),
        device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
        dtype: str = typer.Option("auto", help="fp16, bf16, fp32 or auto (fp16 on CUDA, fp32 on CPU)."),
        backend: str = typer.Option("torch", help="torch, torch-compile, onnxruntime or tensorrt."),
        engines: Path = typer.Option(None, help="Export/engine folder for the onnxruntime and tensorrt backends."),
        out: Path = typer.Option(None, "--out", "-o", help="Output grid PNG (single prompt). Default out.png."),
        out_dir: Path = typer.Option(None, help="Output folder (one grid per prompt; required with --prompts)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace grids that already exist (default: refuse)."),
        skip_existing: bool = typer.Option(False, "--skip-existing", help="Keep grids that already exist and make the rest (resume a batch)."),
        save_views: bool = typer.Option(False, "--save-views", help="Also write one PNG per view and a JSON sidecar."),
        json_out: bool = typer.Option(False, "--json", help="Print a JSON summary instead of text."),
    ) -> None:
        """Generate consistent views of an object from a prompt in a few steps."""
        from mvz.cli.generate_impl import GenerateRequest, run_generate

        request = GenerateRequest(**{k: v for k, v in locals().items() if k in GenerateRequest.__dataclass_fields__})
        run_generate(request)

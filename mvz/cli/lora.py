"""``mvz lora convert IN OUT --to diffusers|upstream``: a LoRA of any layout mvz reads, written in another.

``--to diffusers`` writes ``unet.``-prefixed PEFT keys with diffusers' own saver, so MV-Adapter's diffusers
pipeline can ``load_lora_weights`` an mvz LoRA (its ``_mv`` modules included); ``--to upstream`` writes the PEFT
layout MVC-ZigAL's code and ``mvz`` load. The layouts and their rules are in ``mvz.models.lora_formats``.
"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    lora_app = typer.Typer(help="LoRA files: convert between the PEFT (upstream), diffusers and kohya layouts.",
                           no_args_is_help=True)

    @lora_app.command("convert")
    def convert(
        src: Path = typer.Argument(..., metavar="IN", help="LoRA file: mvz/upstream PEFT, diffusers or kohya/A1111 layout."),
        dst: Path = typer.Argument(..., metavar="OUT", help="File to write (.safetensors)."),
        to: str = typer.Option(..., "--to", help="Layout to write: 'diffusers' (load_lora_weights) or 'upstream' "
                               "(MVC-ZigAL / mvz PEFT keys)."),
        json_out: bool = typer.Option(False, "--json", help="Machine-readable summary."),
    ) -> None:
        """Convert a LoRA file between layouts (text-encoder LoRAs are refused: mvz LoRAs are UNet-only)."""
        import json
        from types import SimpleNamespace

        from mvz.errors import InputError
        from mvz.models.lora_formats import WRITTEN_LAYOUTS, read_lora, resolve_lora_path, write_lora
        from mvz.models.specs import shipped_config

        if to not in WRITTEN_LAYOUTS:
            raise InputError(f"--to {to!r} is not a layout mvz writes.", f"Use one of: {', '.join(WRITTEN_LAYOUTS)}.")
        src = resolve_lora_path(src)
        if dst.exists() and dst.resolve() == src.resolve():
            raise InputError(f"OUT {dst} is the input file.", "Write the converted LoRA to another path.")
        if dst.is_dir():
            raise InputError(f"OUT {dst} is a folder.", "Give a file name, e.g. lora_diffusers.safetensors.")
        # kohya's sgm block names map by the SDXL UNet's layers_per_block (the config mvz ships)
        unet_config = SimpleNamespace(**shipped_config("sdxl-lcm", "unet"))
        lora = read_lora(src, unet_config=unet_config)
        write_lora(lora, dst, to)
        summary = {"out": str(dst), "layout": to, "from": lora.layout, "modules": len(lora.modules),
                   "rank": lora.rank}
        if json_out:
            typer.echo(json.dumps(summary))
            return
        typer.echo(f"wrote {dst} ({to} layout, {summary['modules']} modules, rank {lora.rank}, from {lora.layout})")

    app.add_typer(lora_app, name="lora")

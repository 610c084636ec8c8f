"""``mvz info``: versions, devices and which backends are usable here."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("info")
    def info(json_out: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
        """Print versions, devices and the backends usable on this machine."""
        import json
        import platform
        from importlib import metadata

        import torch

        import mvz

        versions = {"mvz": mvz.__version__, "python": platform.python_version(), "torch": torch.__version__}
        for pkg in ("diffusers", "transformers", "peft", "accelerate", "safetensors", "onnx", "onnxruntime",
                    "onnxruntime-gpu", "polygraphy", "tensorrt"):
            try:
                versions[pkg] = metadata.version(pkg)
            except metadata.PackageNotFoundError:
                versions[pkg] = None
        devices = [{"type": "cpu", "name": platform.processor() or platform.machine()}]
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                devices.append({"type": f"cuda:{i}", "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                                "compute_capability": f"{p.major}.{p.minor}"})
        try:
            from engines import available_backends

            backends = available_backends()
        except ImportError as exc:
            backends = {"torch": None, "engines": f"engines package not importable: {exc}"}
        data = {"versions": versions, "devices": devices,
                "backends": {k: ("available" if v is None else f"unavailable: {v}") for k, v in backends.items()}}
        if json_out:
            print(json.dumps(data, indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        console = Console()
        t = Table(title="versions")
        t.add_column("package")
        t.add_column("version")
        for k, v in versions.items():
            t.add_row(k, v or "[dim]not installed[/dim]")
        console.print(t)
        d = Table(title="devices")
        for col in ("device", "name", "details"):
            d.add_column(col)
        for dev in devices:
            extra = ", ".join(f"{k}={v}" for k, v in dev.items() if k not in ("type", "name"))
            d.add_row(dev["type"], str(dev["name"]), extra)
        console.print(d)
        b = Table(title="backends")
        b.add_column("backend")
        b.add_column("status")
        for k, v in data["backends"].items():
            b.add_row(k, "[green]available[/green]" if v == "available" else f"[yellow]{v}[/yellow]")
        console.print(b)

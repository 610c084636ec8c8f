"""Host memory and time of a full-size ``mvz export`` from a CPU: peak RSS, time per stage, file sizes.

Runs, each in a fresh process (so each peak is its own), the command a user would run on a workstation::

    mvz export --model sdxl-lcm --random-weights --resolution 768 --views 6 --onnx-only --skip-parity --device cpu

once without and once with a random rank-4 LoRA in the upstream layout (written here from the architecture,
built on the meta device: no weights). Peak RSS comes from the kernel (``os.wait4``'s ``ru_maxrss``); the RSS
and its CPU time (user + system) also come from
there, since wall time on a shared machine says more about the neighbours than about the export; the RSS
is also sampled every half second (psutil, when installed) so the report shows where the peak falls. Stage
times come from the export's own ``--json`` timings. Results go to a JSON file; ``bench/README.md`` has the
figures measured on the development machine.

    python -m bench.export_memory --out /tmp/export-bench --results export_memory.json [--no-lora]

It needs about 14 GiB of free memory and 12 GB of disk per run (the folder is removed after each run unless
``--keep``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

GiB = 1 << 30


def write_random_lora(path: Path, model: str = "sdxl-lcm", rank: int = 4, seed: int = 0) -> Path:
    """A random LoRA for the full-size architecture in the upstream PEFT layout, from shapes alone."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from export.fuse import lora_target_modules
    from mvz.models.attention import install_mv_processors
    from mvz.models.specs import PRESETS, shipped_config

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(shipped_config(PRESETS[model].configs, "unet"))
        install_mv_processors(unet, init_from_base=False)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, lin in lora_target_modules(unet).items():
        sd[f"{name}.lora_A.weight"] = torch.randn(rank, lin.in_features, generator=g) / lin.in_features ** 0.5
        sd[f"{name}.lora_B.weight"] = 0.01 * torch.randn(lin.out_features, rank, generator=g)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"format": "pt", "lora_rank": str(rank), "lora_alpha": str(rank)})
    return path


def _sample_rss(pid: int, samples: list, stop: threading.Event) -> None:
    try:
        import psutil
    except ImportError:
        return
    t0 = time.perf_counter()
    try:
        proc = psutil.Process(pid)
        while not stop.is_set():
            samples.append((round(time.perf_counter() - t0, 1), proc.memory_info().rss))
            stop.wait(0.5)
    except psutil.Error:  # the process ended
        pass


def run_export(args: list[str], out: Path) -> dict:
    """One ``mvz export`` in a child process: its wall time, peak RSS (kernel), RSS samples, timings, files."""
    cmd = [sys.executable, "-m", "mvz", "export", *args, "--out", str(out), "--force", "--json"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples: list = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_rss, args=(proc.pid, samples, stop), daemon=True)
    sampler.start()
    # read the pipes on threads: a full pipe would block the child
    output: dict[str, str] = {}
    readers = [threading.Thread(target=lambda k=k, f=f: output.__setitem__(k, f.read()), daemon=True)
               for k, f in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    stop.set()
    for r in readers:
        r.join()
    result = {"command": " ".join(["mvz", "export", *args]), "exit_code": proc.returncode, "wall_s": round(wall, 1),
              # CPU time: what the run costs with the machine to itself (wall grows with other processes)
              "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
              "peak_rss_gib": round(usage.ru_maxrss * 1024 / GiB, 2),
              "rss_samples_gib": [(t, round(b / GiB, 2)) for t, b in samples[::4]]}
    if proc.returncode != 0:
        result["stderr_tail"] = output.get("stderr", "")[-3000:]
        return result
    text = output["stdout"]
    payload = json.loads(text[text.index("{\n"):] if not text.startswith("{") else text)  # the CLI's --json object
    result["timings_s"] = {k: round(v, 1) for k, v in payload.get("timings", {}).items()}
    result["files_bytes"] = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/mvz-export-bench"), help="Scratch folder for the exports.")
    ap.add_argument("--results", type=Path, default=Path("export_memory.json"))
    ap.add_argument("--model", default="sdxl-lcm")
    ap.add_argument("--resolution", type=int, default=768)
    ap.add_argument("--views", type=int, default=6)
    ap.add_argument("--exporter", default=None, help="dynamo (default) or torchscript.")
    ap.add_argument("--no-lora", action="store_true", help="Skip the run with a LoRA.")
    ap.add_argument("--no-base", action="store_true", help="Skip the run without a LoRA.")
    ap.add_argument("--keep", action="store_true", help="Keep the exported folders.")
    a = ap.parse_args(argv)

    common = ["--model", a.model, "--random-weights", "--resolution", str(a.resolution), "--views", str(a.views),
              "--onnx-only", "--skip-parity", "--device", "cpu"] + (["--exporter", a.exporter] if a.exporter else [])
    runs = {} if a.no_base else {"base": common}
    if not a.no_lora:
        lora = write_random_lora(a.out / "lora_rank4.safetensors", a.model)
        runs["lora"] = [*common, "--lora", str(lora)]
    results = {"machine": {"cpus": os.cpu_count(), "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") *
                                                                            os.sysconf("SC_PHYS_PAGES") / GiB, 1)},
               "runs": {}}
    for name, args in runs.items():
        folder = a.out / name
        print(f"[export_memory] {name}: mvz export {' '.join(args)}", file=sys.stderr, flush=True)
        results["runs"][name] = run_export(args, folder)
        print(json.dumps(results["runs"][name], indent=1), file=sys.stderr, flush=True)
        a.results.write_text(json.dumps(results, indent=2))
        if not a.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return 0 if all(r["exit_code"] == 0 for r in results["runs"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

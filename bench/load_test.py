"""Load test of a running ``mvz serve``: N concurrent clients for a fixed time, on loopback or anywhere.

    python -m bench.load_test --url http://127.0.0.1:8000 --clients 8 --duration 60 --steps 2 --views 2

Each client posts ``/v1/generate`` back to back (distinct seeds, a few prompts, the same settings, so the
server may batch them) until the time is up. Reports throughput (requests and images per second),
latency p50/p90/p99 of the successful requests, errors by status, and the server's batch-size histogram
over the run (the difference of ``/metrics`` before and after). ``--json`` prints it as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter

import httpx

from bench.stats import percentile

PROMPTS = ("a red chair", "a blue ceramic mug", "a wooden toy robot", "a green desk lamp")


def _samples(metrics_text: str, family_name: str):
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics_text):
        if family.name == family_name:
            yield from family.samples


def stage_totals(metrics_text: str) -> dict[str, tuple[float, float]]:
    """stage -> (sum of seconds, count) of the server's ``mvz_stage_seconds`` histograms."""
    out: dict[str, list[float]] = {}
    for s in _samples(metrics_text, "mvz_stage_seconds"):
        if s.name.endswith(("_sum", "_count")):
            out.setdefault(s.labels["stage"], [0.0, 0.0])[0 if s.name.endswith("_sum") else 1] = s.value
    return {k: (v[0], v[1]) for k, v in out.items()}


def batch_histogram(metrics_text: str) -> dict[int, int]:
    """Batches per size from the cumulative ``mvz_batch_size`` buckets of a Prometheus text page."""
    cumulative = {float(s.labels["le"]): s.value for s in _samples(metrics_text, "mvz_batch_size")
                  if s.name == "mvz_batch_size_bucket" and s.labels["le"] != "+Inf"}
    hist, below = {}, 0.0
    for le in sorted(cumulative):
        hist[int(le)] = int(cumulative[le] - below)
        below = cumulative[le]
    return hist


async def _client(http: httpx.AsyncClient, idx: int, body: dict, until: float, log: list) -> None:
    n = 0
    while time.perf_counter() < until:
        req = {**body, "prompt": PROMPTS[(idx + n) % len(PROMPTS)], "seed": idx * 100_000 + n}
        t0 = time.perf_counter()
        try:
            r = await http.post("/v1/generate", json=req)
            status = str(r.status_code)
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        log.append((status, time.perf_counter() - t0))
        n += 1


async def run_load(url: str, clients: int, duration_s: float, body: dict, timeout_s: float = 600.0) -> dict:
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as http:
        (await http.get("/healthz")).raise_for_status()
        page = (await http.get("/metrics")).text
        before, stages_before = batch_histogram(page), stage_totals(page)
        log: list[tuple[str, float]] = []
        t0 = time.perf_counter()
        await asyncio.gather(*(_client(http, i, body, t0 + duration_s, log) for i in range(clients)))
        wall = time.perf_counter() - t0
        page = (await http.get("/metrics")).text
        after, stages_after = batch_histogram(page), stage_totals(page)
    ok = [dt for status, dt in log if status == "200"]
    views = body.get("views") or len(body.get("azimuths") or []) or 6
    hist = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return {
        "url": url, "clients": clients, "duration_s": round(wall, 2), "request": body,
        "requests": len(log), "ok": len(ok),
        "errors": dict(Counter(status for status, _ in log if status != "200")),
        "throughput_rps": round(len(ok) / wall, 4), "images_per_s": round(len(ok) * views / wall, 4),
        "latency_s": {f"p{q}": round(percentile(ok, q), 4) for q in (50, 90, 99)} if ok else {},
        "batch_sizes": {k: v for k, v in hist.items() if v},
        "server_stage_mean_s": _stage_means(stages_before, stages_after),
    }


def _stage_means(before: dict, after: dict) -> dict[str, float]:
    """Mean seconds per observation of each server stage over the run (per request: queue, encode, total;
    per batch: conditioning, denoise, decode)."""
    means = {}
    for stage, (total, count) in after.items():
        t0, c0 = before.get(stage, (0.0, 0.0))
        if count > c0:
            means[stage] = round((total - t0) / (count - c0), 4)
    return means


def format_report(r: dict) -> str:
    lat = r["latency_s"]
    lines = [
        f"{r['clients']} clients x {r['duration_s']} s against {r['url']}  ({json.dumps(r['request'])})",
        f"requests {r['requests']}  ok {r['ok']}  errors {r['errors'] or 'none'}",
        f"throughput {r['throughput_rps']:.3f} req/s  ({r['images_per_s']:.3f} images/s)",
        "latency " + ("  ".join(f"{k} {v:.3f} s" for k, v in lat.items()) if lat else "n/a (no successful request)"),
        "batch sizes " + ("  ".join(f"{k}: {v}" for k, v in sorted(r["batch_sizes"].items())) or "none"),
        "server mean s " + "  ".join(f"{k} {v:.3f}" for k, v in r["server_stage_mean_s"].items()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=60.0, help="Seconds of load (requests in flight finish).")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--views", type=int, default=6)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--json", action="store_true", help="Print the report as JSON.")
    a = p.parse_args(argv)
    if a.clients < 1 or a.duration <= 0:
        p.error("--clients must be >= 1 and --duration > 0")
    body = {"steps": a.steps, "views": a.views, "guidance": a.guidance}
    if a.resolution:
        body["resolution"] = a.resolution
    report = asyncio.run(run_load(a.url, a.clients, a.duration, body))
    print(json.dumps(report, indent=2) if a.json else format_report(report))


if __name__ == "__main__":
    main()

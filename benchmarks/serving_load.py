"""Online API under load: the Ray Serve application (batching over onnxruntime) vs a baseline
one-process server without batching, on the same cores and the same model.

Both answer ``POST /v1/models/{name}/samples {n, seed}`` with base64 PNGs. The baseline is a
one-process FastAPI/uvicorn app: ``--baseline onnx`` (default, ``_onnx_server``) runs the same
registered version's ONNX graphs in onnxruntime, ``--baseline torch`` (``_torch_eager_server``)
its torch checkpoint in eager mode. A closed-loop load generator (httpx, asyncio) keeps ``c``
requests in flight for ``--seconds`` per level, after a warm-up; requests/s and p50/p99
latency are reported per (server, n, concurrency).

Needs a registry with a champion, e.g. after ``make run``:

    .venv/bin/python benchmarks/serving_load.py --model fashion-mnist-vae --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(url: str, n: int, concurrency: int, seconds: float, warmup: float) -> dict[str, float]:
    import httpx

    latencies: list[float] = []
    failures = 0
    stop_at = time.perf_counter() + warmup + seconds
    measure_from = time.perf_counter() + warmup
    counter = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal failures, counter
        while time.perf_counter() < stop_at:
            counter += 1
            t0 = time.perf_counter()
            r = await client.post(url, json={"n": n, "seed": counter})
            t1 = time.perf_counter()
            if r.status_code != 200:
                failures += 1
            elif t0 >= measure_from:
                latencies.append(t1 - t0)

    # One client (one keep-alive connection) per simulated user: a pool shared by all of them
    # rescans its waiting requests on every completion, and when a batch answers 32 requests at
    # once that cost the load generator 4-5 ms of CPU per request (1.5 ms with a client each).
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    clients = [httpx.AsyncClient(timeout=60, limits=limits) for _ in range(concurrency)]
    try:
        await asyncio.gather(*(worker(client) for client in clients))
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))
    if len(latencies) < 2:
        raise RuntimeError(f"{url}: {len(latencies)} successful requests, {failures} failed; is the server healthy?")
    latencies.sort()
    q = statistics.quantiles(latencies, n=100)
    return {"rps": len(latencies) / seconds, "p50_ms": q[49] * 1e3, "p99_ms": q[98] * 1e3, "failures": failures,
            "requests": len(latencies)}


def wait_ready(url: str, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s")


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """The options of the Serve application under test (shared with serving_cpu.py)."""
    parser.add_argument("--serve-defaults", action="store_true", help="Ray Serve's own defaults instead of "
                        "serving.app.SERVE_ENV (the throughput mode `genmodels serve` sets)")
    parser.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                        help="a serving.app.ServingArgs knob, e.g. sample_in_ingress=true (repeatable)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment of the local Ray, e.g. RAY_SERVE_ENABLE_HA_PROXY=1 (repeatable)")


def server_label(args: argparse.Namespace) -> str:
    return "".join(f", {kv}" for kv in [*args.arg, *args.env])


def start_serve(args: argparse.Namespace) -> int:
    """Start a local Ray and the application as ``genmodels serve`` does, with ``args``' knobs and
    environment; its HTTP port."""
    from ray import serve

    from genmodels.ray_runtime import ensure_ray
    from serving.app import build_app, use_serve_env

    for kv in args.env:
        key, _, value = kv.partition("=")
        os.environ[key] = value
    if not args.serve_defaults:
        use_serve_env()  # what `genmodels serve` runs with
    ensure_ray()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    knobs = dict(kv.partition("=")[::2] for kv in args.arg)
    serve.run(build_app({"models": [args.model], "reload_interval_s": 3600, **knobs}), name="bench", route_prefix="/")
    return port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fashion-mnist-vae")
    parser.add_argument("--sizes", default="1,64", help="images per request")
    parser.add_argument("--concurrency", default="1,16,32,64")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--baseline", choices=["onnx", "torch"], default="onnx")
    add_server_options(parser)
    args = parser.parse_args()

    from ray import serve

    from genmodels import registry
    from genmodels.ray_runtime import stop_ray

    registry.configure()
    champion = registry.champion(args.model)
    if champion is None:
        sys.exit(f"{args.model} has no champion in {os.environ.get('MLFLOW_TRACKING_URI') or 'the default registry'}")
    sizes = [int(s) for s in args.sizes.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    rows = []

    def measure(server: str, port: int) -> None:
        wait_ready(f"http://127.0.0.1:{port}/healthz")
        for n in sizes:
            for c in levels:
                r = asyncio.run(load(f"http://127.0.0.1:{port}/v1/models/{args.model}/samples", n, c,
                                     args.seconds, args.warmup))
                rows.append((server, n, c, r))
                print(rows[-1], flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        # Baseline first, alone on the machine (Ray not started yet).
        port = free_port()
        if args.baseline == "torch":
            checkpoint = Path(tmp) / "model.pt"
            checkpoint.write_bytes(registry.download_checkpoint(champion))
            command = ["_torch_eager_server.py", "--checkpoint", str(checkpoint)]
            baseline = "torch eager, per request"
        else:
            command = ["_onnx_server.py"]
            baseline = "FastAPI + onnxruntime, per request"
        server = subprocess.Popen([sys.executable, str(Path(__file__).with_name(command[0])), *command[1:],
                                   "--model", args.model, "--port", str(port)])
        try:
            measure(baseline, port)
        finally:
            server.terminate()
            server.wait(timeout=30)

        port = start_serve(args)
        try:
            measure(f"Ray Serve{server_label(args)}, batched", port)
        finally:
            serve.shutdown()
            stop_ray()

    base = {(n, c): r["rps"] for name, n, c, r in rows if name == baseline}
    print(f"\n{args.model} v{champion.version}, {os.cpu_count()} CPUs, {args.seconds:.0f} s per level")
    print("| server | n | concurrency | requests/s | vs baseline | p50 ms | p99 ms | failed |")
    print("|---|---|---|---|---|---|---|---|")
    for name, n, c, r in rows:
        print(f"| {name} | {n} | {c} | {r['rps']:.1f} | {r['rps'] / max(base[(n, c)], 1e-9):.2f}x | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['failures']} |")


if __name__ == "__main__":
    main()

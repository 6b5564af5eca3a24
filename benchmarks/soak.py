"""Soak: the embedded server under steady load, then under load with its sampling replica killed.

Starts ``genmodels serve --num-cpus 2`` on 127.0.0.1 (its own local Ray, as ``make run`` does)
over a fresh work dir with three tiny untrained models registered as champions (8x8 binary
images: a VAE, a CVAE and a mixture; export and registration take seconds, no training), then:

1. warm-up: ``--warmup`` seconds of the load below; the server's RSS is read after it;
2. steady: ``--seconds`` at ``--concurrency`` requests in flight over every sampling route
   (samples, grid.png, interpolate, analogies, complete) plus a bulk job submitted every
   ``--job-every`` seconds; every non-2xx answer or transport error is a failed request. Then
   every accepted job is waited for: each must end ``succeeded`` with exactly its n samples and a
   manifest whose shards verify (nothing lost). RSS again: its growth is over the whole run;
3. fault: ``--fault-seconds`` of the same load; ``--kill-after`` seconds in, the replica that samples (the Api
   ingress by default, the Sampler with ``sample_in_ingress=False``)
   process is SIGKILLed (as the OOM killer would); failed requests are counted over the phase.

The server's RSS is the sum over its process session (driver, raylet, GCS, proxy, replicas,
writer actors). Each load loop is bounded by its deadline and a request cap. Prints one JSON
summary; exits 1 when a target is missed (0 failed steady requests, RSS growth < 10%,
<= 1% failed requests with the replica killed, every job complete).

    .venv/bin/python benchmarks/soak.py            # 60 s at concurrency 64, as recorded
    .venv/bin/python benchmarks/soak.py --seconds 10 --fault-seconds 15 --concurrency 16  # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATASET = "soak"
FAMILIES = ("vae", "cvae", "mixture")
VAE, CVAE, MIX = (f"{DATASET}-{f}" for f in FAMILIES)
#: Requests a load loop sends at most, whatever the deadline (a guard against a runaway loop).
REQUEST_CAP = 2_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def register_models(work: Path) -> str:
    """Tiny untrained champions of VAE, CVAE and mixture in an MLflow sqlite registry; its URI."""
    import torch

    from genmodels import registry
    from genmodels.export import export_sampler
    from genmodels.models import build_model
    from genmodels.models.base import ImageSpec

    tracking_uri = f"sqlite:///{work}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    os.environ.setdefault("GENMODELS_GIT_COMMIT", "0" * 16)
    registry.configure(tracking_uri)
    overrides = {"vae": {"latent_dim": 3, "hidden": (16,)}, "cvae": {"latent_dim": 3, "hidden": (16,)},
                 "mixture": {"n_components": 4}}
    for family in FAMILIES:
        torch.manual_seed(0)
        model = build_model(family, ImageSpec(channels=1, height=8, width=8, levels=2), **overrides[family]).eval()
        paths = export_sampler(model, work / "graphs" / family, likelihood=False)
        checkpoint = io.BytesIO()
        torch.save({"family": family, "weights": model.state_dict()}, checkpoint)
        reg = registry.register(dataset=DATASET, family=family, preset="quick", checkpoint=checkpoint.getvalue(),
                                onnx_files=paths, metrics={registry.gate_metric(family): 30.0}, params={},
                                snapshot_hash="0" * 64, artifact_root=(work / "mlflow").as_uri())
        registry.promote(reg.name, reg.version)
    return tracking_uri


def start_server(work: Path, tracking_uri: str, port: int, options: tuple[str, ...] = ()) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "GENMODELS_", "MLFLOW_"))}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, GENMODELS_WORK_DIR=str(work / "server"),
               GENMODELS_GIT_COMMIT="0" * 16)
    cli = str(Path(sys.executable).parent / "genmodels")
    # A session of its own: its processes (Ray's too) are the server's, for RSS and for the kill.
    return subprocess.Popen([cli, "serve", "--num-cpus", "2", "--port", str(port), "--metrics-port", str(free_port()),
                             "--models", ",".join((VAE, CVAE, MIX)), "--reload-interval", "60", *options],
                            env=env, cwd=work, stdout=open(work / "server.log", "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def session_processes(session: int) -> dict[int, tuple[bytes, int]]:
    """pid -> (command line, RSS bytes) of every process in the process session ``session``."""
    page = os.sysconf("SC_PAGE_SIZE")
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/statm", "rb") as f:
                rss_pages = int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            continue
        fields = stat[stat.rindex(b")") + 2:].split()  # state, ppid, pgrp, session, ...
        if int(fields[3]) == session:
            out[int(entry)] = (cmdline, rss_pages * page)
    return out


def server_rss(session: int) -> int:
    return sum(rss for _, rss in session_processes(session).values())


def serve_replicas(session: int, deployment: bytes) -> list[int]:
    """PIDs of the replicas of the genmodels application's ``deployment`` in ``session``."""
    # Ray titles a replica's process after its deployment and the method it runs.
    return [pid for pid, (cmd, _) in session_processes(session).items()
            if cmd.startswith((b"ray::ServeReplica:genmodels:" + deployment,
                               b"ray::SERVE_REPLICA::genmodels#" + deployment))]


def sampler_replicas(session: int) -> list[int]:
    """The replicas that sample: the Sampler's where there is one, else the Api ingress's."""
    return serve_replicas(session, b"Sampler") or serve_replicas(session, b"Api")


def wait_ready(client, proc: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"genmodels serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if client.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"genmodels serve not healthy after {timeout:.0f} s")


def png_b64(pixels) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class Load:
    """Closed-loop load: ``concurrency`` workers, each sending its next request as soon as the
    last was answered; one route after another, a bulk job at most every ``job_every`` s."""

    def __init__(self, base: str, outputs: str, job_every: float, job_n: int) -> None:
        import numpy as np

        digit = np.zeros((8, 8), np.uint8)
        digit[1:7, 3:5] = 255
        self.base, self.outputs, self.job_every, self.job_n = base, outputs.rstrip("/"), job_every, job_n
        self.seed = itertools.count(1)
        image = png_b64(digit)
        self.routes = [
            ("samples", "POST", f"/v1/models/{VAE}/samples", lambda s: {"n": 1 + s % 4, "seed": s}),
            ("samples", "POST", f"/v1/models/{CVAE}/samples", lambda s: {"n": 2, "seed": s, "labels": s % 10}),
            ("grid", "GET", f"/v1/models/{VAE}/grid.png", lambda s: {"n": 9, "seed": s}),
            ("interpolate", "POST", f"/v1/models/{VAE}/interpolate", lambda s: {"seed_a": s, "seed_b": s + 1,
                                                                                 "steps": 5}),
            ("analogies", "POST", f"/v1/models/{CVAE}/analogies", lambda s: {"image": image, "label": 1}),
            ("complete", "POST", f"/v1/models/{MIX}/complete", lambda s: {"image": image, "known_rows": 4,
                                                                          "n": 2, "seed": s}),
        ]
        self.jobs: list[dict] = []
        self.next_job_at = 0.0

    async def run(self, seconds: float, concurrency: int, at: float | None = None, fault=None) -> dict:
        """``seconds`` of load; ``fault()`` is called ``at`` seconds in. Counts per route."""
        import httpx

        counts: dict[str, dict[str, int]] = {}
        errors: dict[str, int] = {}
        sent = 0
        start = time.monotonic()
        stop_at = start + seconds
        route_cycle = itertools.cycle(range(len(self.routes)))

        def count(route: str, ok: bool, what: str) -> None:
            c = counts.setdefault(route, {"requests": 0, "failed": 0})
            c["requests"] += 1
            if not ok:
                c["failed"] += 1
                errors[f"{route} {what}"] = errors.get(f"{route} {what}", 0) + 1

        async def one(client: httpx.AsyncClient) -> None:
            now = time.monotonic()
            if now >= self.next_job_at:
                self.next_job_at = now + self.job_every
                seed = next(self.seed)
                body = {"model": VAE, "n": self.job_n, "seed": seed, "shard_size": max(1, self.job_n // 4),
                        "format": "npz", "output": f"{self.outputs}/soak-{seed}"}
                route, call = "jobs", client.post("/v1/jobs", json=body)
            else:
                route, method, path, make = self.routes[next(route_cycle)]
                seed = next(self.seed)
                call = (client.get(path, params=make(seed)) if method == "GET" else client.post(path, json=make(seed)))
                body = None
            try:
                r = await call
            except httpx.HTTPError as exc:
                count(route, False, type(exc).__name__)
                return
            ok = r.status_code in (200, 202)
            count(route, ok, str(r.status_code))
            if ok and body is not None:
                self.jobs.append({"job_id": r.json()["job_id"], "n": body["n"], "output": body["output"]})

        async def worker(client: httpx.AsyncClient) -> None:
            nonlocal sent
            while time.monotonic() < stop_at and sent < REQUEST_CAP:
                sent += 1
                await one(client)

        async def trigger() -> None:
            if fault is not None and at is not None:
                await asyncio.sleep(at)
                fault()

        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=self.base, timeout=60, limits=limits) as client:
            await asyncio.gather(trigger(), *(worker(client) for _ in range(concurrency)))
        elapsed = time.monotonic() - start
        total = sum(c["requests"] for c in counts.values())
        failed = sum(c["failed"] for c in counts.values())
        return {"seconds": round(elapsed, 1), "requests": total, "failed": failed,
                "failed_share": failed / total if total else None, "requests_per_s": round(total / elapsed, 1),
                "by_route": counts, "errors": errors}


def wait_jobs(client, jobs: list[dict], timeout: float) -> dict:
    """Every accepted job to its end; each must have succeeded with all its samples, verified."""
    from genmodels import bulk

    deadline = time.monotonic() + timeout
    ended: dict[str, dict] = {}
    while len(ended) < len(jobs) and time.monotonic() < deadline:
        for job in jobs:
            if job["job_id"] in ended:
                continue
            r = client.get(f"/v1/jobs/{job['job_id']}")
            if r.status_code == 200 and r.json()["status"] not in ("queued", "running"):
                ended[job["job_id"]] = r.json()
        time.sleep(0.5)
    complete, problems = 0, []
    for job in jobs:
        status = ended.get(job["job_id"])
        if status is None:
            problems.append(f"{job['job_id']}: not ended in {timeout:.0f} s")
            continue
        if status["status"] != "succeeded" or status["done"] != job["n"]:
            problems.append(f"{job['job_id']}: {status['status']} at {status['done']}/{job['n']}")
            continue
        try:
            bulk.verify(job["output"])
        except Exception as exc:  # any defect of the written shards is a lost job
            problems.append(f"{job['job_id']}: {exc}")
            continue
        complete += 1
    return {"accepted": len(jobs), "complete": complete, "samples": sum(j["n"] for j in jobs), "problems": problems}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="steady phase")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--haproxy", action="store_true", help="genmodels serve --haproxy")
    ap.add_argument("--fault-seconds", type=float, default=30.0, help="the phase with the sampling replica killed")
    ap.add_argument("--kill-after", type=float, default=5.0, help="seconds into the fault phase")
    ap.add_argument("--job-every", type=float, default=3.0, help="seconds between bulk job submissions")
    ap.add_argument("--job-n", type=int, default=2_000, help="samples per bulk job")
    ap.add_argument("--work-dir", type=Path, default=None, help="default: a temporary directory, removed after")
    args = ap.parse_args()

    import httpx

    with tempfile.TemporaryDirectory(prefix="genmodels-soak-") as tmp:
        work = (args.work_dir or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        tracking_uri = register_models(work)
        port = free_port()
        proc = start_server(work, tracking_uri, port, ("--haproxy",) if args.haproxy else ())
        base = f"http://127.0.0.1:{port}"
        client = httpx.Client(base_url=base, timeout=60)
        summary: dict = {"concurrency": args.concurrency, "cpus": os.cpu_count(), "load_before": os.getloadavg()}
        try:
            wait_ready(client, proc, work / "server.log")
            summary["start_s"] = round(time.monotonic() - t0, 1)
            outputs = (work / "server" / "store" / "outputs").as_uri()
            load = Load(base, outputs, args.job_every, args.job_n)
            summary["warmup"] = asyncio.run(load.run(args.warmup, args.concurrency))
            rss0 = server_rss(proc.pid)
            summary["steady"] = asyncio.run(load.run(args.seconds, args.concurrency))
            summary["steady"]["jobs"] = wait_jobs(client, load.jobs, timeout=180)
            rss1 = server_rss(proc.pid)
            summary["rss_mb"] = {"after_warmup": round(rss0 / 2**20, 1), "after_steady": round(rss1 / 2**20, 1),
                                 "growth": round(rss1 / rss0 - 1, 4)}

            load.jobs = []
            killed: list[int] = []

            def kill() -> None:
                pids = sampler_replicas(proc.pid)
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                killed.extend(pids)

            summary["fault"] = asyncio.run(load.run(args.fault_seconds, args.concurrency, at=args.kill_after,
                                                    fault=kill))
            summary["fault"]["killed_pids"] = killed
            summary["fault"]["replica_back"] = bool(sampler_replicas(proc.pid)) and not set(killed) & set(
                sampler_replicas(proc.pid))
            summary["fault"]["jobs"] = wait_jobs(client, load.jobs, timeout=180)
        finally:
            client.close()
            summary["load_after"] = os.getloadavg()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)

    steady, fault = summary["steady"], summary["fault"]
    summary["targets"] = {
        "steady_no_failed_requests": steady["failed"] == 0,
        "rss_growth_under_10pct": summary["rss_mb"]["growth"] < 0.10,
        "fault_failed_at_most_1pct": fault["failed_share"] is not None and fault["failed_share"] <= 0.01,
        "replica_killed_and_back": bool(fault["killed_pids"]) and fault["replica_back"],
        "every_job_complete": not steady["jobs"]["problems"] and not fault["jobs"]["problems"],
    }
    print(json.dumps(summary, indent=2))
    return 0 if all(summary["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Where the CPU of an online request goes: CPU seconds per process (from /proc) while the load
generator of ``serving_load.py`` keeps ``--concurrency`` sample requests in flight against the
Ray Serve application, reported per request.

On a machine with few cores the processes of a Serve request (HTTP proxy, FastAPI ingress
replica, Sampler replica) and the load generator compete for the same CPUs, so CPU per request,
not latency, says what bounds throughput. Linux only (reads /proc).

    GENMODELS_WORK_DIR=<work dir of make run> .venv/bin/python benchmarks/serving_cpu.py \\
        --model fashion-mnist-vae --n 1 --concurrency 16 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import subprocess
import sys
import time
from pathlib import Path

from serving_load import add_server_options, load, server_label, start_serve, wait_ready


def cpu_seconds_by_process() -> dict[int, tuple[float, str]]:
    """pid -> (user + system CPU seconds, command line) of every process readable in /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline") as f:
                command = f.read().replace("\0", " ").strip()
        except OSError:  # the process ended meanwhile
            continue
        out[int(pid)] = ((int(fields[11]) + int(fields[12])) / tick, command)
    return out


def start_profiles(directory: Path, seconds: float) -> list[tuple[Path, subprocess.Popen]]:
    """py-spy (beside this interpreter) sampling every Serve replica for ``seconds``, raw stacks."""
    directory.mkdir(parents=True, exist_ok=True)
    spy = Path(sys.executable).parent / "py-spy"
    runs = []
    for pid, (_, command) in cpu_seconds_by_process().items():
        if command.startswith("ray::ServeReplica"):
            name = command.split()[0].replace("ray::", "").replace(":", "-")
            out = directory / f"{name}-{pid}.txt"
            proc = subprocess.Popen([str(spy), "record", "--pid", str(pid), "--duration", str(int(seconds)),
                                     "--rate", "250", "--format", "raw", "--nonblocking", "--output", str(out)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            runs.append((out, proc))
    return runs


def frame_name(frame: str) -> str:
    """py-spy's ``function (path/file.py:line)`` as ``function (file.py)``: one entry per function."""
    function, _, where = frame.partition(" (")
    return f"{function} ({where.split(':')[0].rsplit('/', 1)[-1]})" if where else function


def summarize_profile(path: Path, top: int) -> str:
    """The functions where a replica's samples sit (self) and those under which they run (total)."""
    own, under = collections.Counter(), collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = [frame_name(f) for f in stack.split(";")]
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            under[frame] += int(count)
    lines = [f"{path.stem}: {total} samples"]
    for title, counter in (("self", own), ("total", under)):
        shares = (f"{frame} {n / total:.0%}" for frame, n in counter.most_common(top))
        lines.append(f"  {title}: " + "; ".join(shares))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fashion-mnist-vae")
    parser.add_argument("--n", type=int, default=1, help="images per request")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--top", type=int, default=6, help="processes listed")
    parser.add_argument("--profile", type=Path, default=None,
                        help="also sample every Serve replica with py-spy into this folder and summarize")
    add_server_options(parser)
    args = parser.parse_args()

    from ray import serve

    from genmodels import registry

    registry.configure()
    try:
        port = start_serve(args)
        wait_ready(f"http://127.0.0.1:{port}/healthz")
        url = f"http://127.0.0.1:{port}/v1/models/{args.model}/samples"
        asyncio.run(load(url, args.n, args.concurrency, 2.0, 1.0))  # warm-up
        profiles = start_profiles(args.profile, args.seconds) if args.profile else []
        before, started = cpu_seconds_by_process(), time.perf_counter()
        result = asyncio.run(load(url, args.n, args.concurrency, args.seconds, 0.0))
        after, elapsed = cpu_seconds_by_process(), time.perf_counter() - started
        for _, proc in profiles:
            proc.wait(timeout=60)
    finally:
        serve.shutdown()

    requests = result["requests"]
    used = sorted(((cpu - before.get(pid, (0.0, ""))[0], command) for pid, (cpu, command) in after.items()),
                  reverse=True)
    mode = ("Ray Serve defaults" if args.serve_defaults else "serving.app.SERVE_ENV") + server_label(args)
    print(f"{args.model}, n={args.n}, concurrency {args.concurrency}, {mode}: {result['rps']:.1f} requests/s, "
          f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, {os.cpu_count()} CPUs")
    print("| process | CPU ms per request | share of one core |")
    print("|---|---|---|")
    for cpu, command in used[: args.top]:
        name = command.split()[0] if command.startswith("ray::") else command[:60]
        print(f"| `{name}` | {cpu / requests * 1e3:.2f} | {cpu / elapsed:.0%} |")
    print(f"| all processes | {sum(c for c, _ in used) / requests * 1e3:.2f} | {sum(c for c, _ in used) / elapsed:.0%} |")
    for out, _ in profiles:
        if out.exists():
            print(summarize_profile(out, args.top * 2))


if __name__ == "__main__":
    main()

"""Servers of the scaled-out setup, started as real processes on this machine for a test: a
multi-node Ray cluster (``ray start --head`` + ``ray start --address``) and an MLflow tracking
server. Each runs in its own session (``start_new_session``) and is stopped by killing exactly
that session's processes: ``ray stop`` would stop every Ray on the machine, other tests' too.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from serving_fixtures import free_port

BIN = Path(sys.executable).parent


def session_pids(sid: int) -> list[int]:
    """Every live process of session ``sid``. Ray workers and Serve replicas leave the process
    group of the command that started them (setpgrp) but never its session."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # Fields after "(comm)": state ppid pgrp session ...; comm may itself hold spaces.
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid:
            pids.append(int(entry.name))
    return pids


def kill_session(sid: int) -> None:
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class Server:
    process: subprocess.Popen
    log: Path

    def tail(self, chars: int = 3000) -> str:
        return log_tail(self.log, chars)


def log_tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


@contextmanager
def server_process(cmd: Sequence[str], env: Mapping[str, str], log: Path, cwd: Path) -> Iterator[Server]:
    """``cmd`` in a new session, output to ``log``; the whole session is SIGKILLed on exit."""
    with open(log, "wb") as out:
        process = subprocess.Popen(list(cmd), env=dict(env), cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield Server(process, log)
    finally:
        kill_session(process.pid)  # the session id is the leader's pid
        process.wait(timeout=30)


def wait_until(ready, what: str, server: Server, timeout: float) -> None:
    """Poll ``ready()``; fail naming ``what`` with the server's log tail if it exits or times out."""
    deadline = time.monotonic() + timeout
    while not ready():
        if server.process.poll() is not None:
            raise RuntimeError(f"{what}: exited with {server.process.returncode}; log:\n{server.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout:.0f} s; log:\n{server.tail()}")
        time.sleep(0.3)


@dataclass(frozen=True)
class RayCluster:
    address: str  # for RAY_ADDRESS / ray.init(address=...)
    temp_dir: Path
    nodes: tuple[Server, ...]


@contextmanager
def ray_cluster(env: Mapping[str, str], num_nodes: int = 2, cpus_per_node: int = 1,
                timeout: float = 120.0) -> Iterator[RayCluster]:
    """A head and ``num_nodes - 1`` worker nodes, each a ``ray start --block`` in its own session.

    ``env`` is what every Ray process of the cluster sees: workers and replicas inherit the
    raylet's environment, not the driver's, so storage credentials go here (as a KubeRay
    Secret puts them on every pod). Each node gets its own loopback address (127.0.0.2, .3, ...):
    Ray swaps 127.0.0.1 for the address that routes to the internet (``resolve_ip_for_localhost``),
    and the rest of 127.0.0.0/8 never leaves the host. Drivers find their node by its local
    raylet process, so they need no address of their own.

    A cluster that does not come up is started once more, from scratch, with a warning that
    carries what its nodes logged: once in sixty CI runs a worker never reached a head that had
    started (every join to its GCS timed out), which says nothing about the code under test.
    """
    with ExitStack() as stack:
        for attempt in (1, 2):
            attempt_stack = ExitStack()
            try:
                cluster = _start_ray_cluster(attempt_stack, env, num_nodes, cpus_per_node, timeout)
            except (TimeoutError, RuntimeError) as exc:
                attempt_stack.close()
                if attempt == 2:
                    raise
                warnings.warn(f"the test Ray cluster did not come up; starting it again: {exc}")
                continue
            stack.push(attempt_stack)
            break
        yield cluster


def _start_ray_cluster(stack: ExitStack, env: Mapping[str, str], num_nodes: int, cpus_per_node: int,
                       timeout: float) -> RayCluster:
    """Start the nodes of :func:`ray_cluster`; ``stack`` stops them and removes their files."""
    # Unix sockets live under the temp dir: pytest's tmp paths can exceed their 107-byte limit.
    temp_dir = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    stack.callback(shutil.rmtree, temp_dir, ignore_errors=True)  # runs last: after the nodes are killed
    env = {**env, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    port = free_port()
    # Fixed default ports (client server 10001, dashboard agent 52365...) would collide with any
    # other Ray on the machine: every listening port is picked free.
    common = ["--block", "--num-cpus", str(cpus_per_node), "--object-store-memory", str(100 * 2**20),
              "--disable-usage-stats"]
    node_ips = [f"127.0.0.{i + 2}" for i in range(num_nodes)]
    head_cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", node_ips[0], "--port", str(port),
                "--temp-dir", str(temp_dir), "--ray-client-server-port", str(free_port()),
                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(free_port()), *common]

    def node_cmd() -> list[str]:
        return ["--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port())]

    def head_logs() -> str:
        logs = temp_dir / "session_latest" / "logs"
        return "".join(f"\n--- head's {name}:\n{log_tail(logs / name, 1500)}"
                       for name in ("gcs_server.out", "raylet.out"))

    nodes = []
    for i in range(num_nodes):
        cmd = head_cmd if i == 0 else [str(BIN / "ray"), "start", "--address", f"{node_ips[0]}:{port}",
                                       "--node-ip-address", node_ips[i], *common]
        node = stack.enter_context(server_process(cmd + node_cmd(), env, temp_dir / f"node{i}.log", temp_dir))
        try:
            wait_until(lambda node=node: b"Ray runtime started" in node.log.read_bytes(),
                       f"ray node {i} ({'head' if i == 0 else 'worker'})", node, timeout)
        except (TimeoutError, RuntimeError) as exc:
            raise type(exc)(f"{exc}{head_logs()}") from None
        nodes.append(node)
    return RayCluster(address=f"{node_ips[0]}:{port}", temp_dir=temp_dir, nodes=tuple(nodes))


@contextmanager
def mlflow_server(backend_dir: Path, artifact_root: str, env: Mapping[str, str],
                  timeout: float = 120.0) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 with a sqlite backend in ``backend_dir`` (standing for a
    database server: no client opens the file); yields its ``http://`` tracking URI."""
    port = free_port()
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{backend_dir / 'mlflow.db'}",
           "--default-artifact-root", artifact_root, "--no-serve-artifacts"]
    uri = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    with server_process(cmd, env, backend_dir / "mlflow-server.log", backend_dir) as server:
        wait_until(healthy, "mlflow server", server, timeout)
        yield uri

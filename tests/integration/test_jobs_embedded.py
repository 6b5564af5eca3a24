"""Bulk jobs in the embedded setting itself: `genmodels serve --num-cpus 2` as a user runs it (its
own local Ray, 2 CPUs, one held by the replica that samples), over HTTP on 127.0.0.1.

A tiny untrained VAE on 8x8 binary images is registered as champion; PNG shards keep a job busy
for seconds, long enough to kill a writer or cancel mid-way. The job outputs go under the
default output root, ``<storage>/outputs/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

httpx = pytest.importorskip("httpx")

from registry_fixtures import register_untrained_champion, registry_env
from serving_fixtures import free_port

from benchmarks.soak import serve_replicas, session_processes  # the one /proc scan of a process session

from genmodels import bulk
from serving.app import haproxy_replicas
from serving.cli import APP_NAME

MODEL = "embedded-vae"
# 16 shards; one writer (the only CPU left) needs several seconds for them.
JOB = {"model": MODEL, "n": 32_000, "seed": 11, "shard_size": 2_000, "format": "png"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from genmodels.models.base import ImageSpec

    root = tmp_path_factory.mktemp("embedded")
    with registry_env(root) as tracking_uri:
        register_untrained_champion(root, "embedded", "vae", ImageSpec(channels=1, height=8, width=8, levels=2),
                                    latent_dim=3, hidden=(16,))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "GENMODELS_", "MLFLOW_"))}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, GENMODELS_GIT_COMMIT="0123456789abcdef",
               GENMODELS_WORK_DIR=str(root / "work"))

    proc, client, output = _start_serve(root, env)
    try:
        yield {"client": client, "proc": proc, "outputs": (root / "work" / "store" / "outputs"), "root": root,
               "env": env, "output": output}
    finally:
        _stop(proc, client)


def _start_serve(root: Path, env: dict[str, str], *options: str) -> tuple[subprocess.Popen, "httpx.Client", list[str]]:
    """`genmodels serve --num-cpus 2` (plus ``options``) in a process session of its own, healthy,
    and the lines of its output so far (a thread reads them: a full pipe would stall the server)."""
    port = free_port()
    cli = str(Path(sys.executable).parent / "genmodels")  # the venv's console script
    proc = subprocess.Popen([cli, "serve", "--num-cpus", "2", "--port", str(port), "--metrics-port",
                             str(free_port()), "--models", MODEL, "--reload-interval", "60", *options],
                            env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    output: list[str] = []
    threading.Thread(target=lambda: output.extend(line.decode(errors="replace") for line in proc.stdout),
                     daemon=True).start()
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, "".join(output)[-3000:]
            try:
                if client.get("/healthz").status_code == 200:
                    return proc, client, output
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "genmodels serve did not come up in 180 s"
            time.sleep(0.5)
    except BaseException:
        _stop(proc, client)
        raise


def _stop(proc: subprocess.Popen, client) -> None:
    client.close()
    if proc.poll() is None:
        # The server alone first, as an operator stops it: it shuts Serve down, HAProxy included.
        # SIGTERM to its whole group killed HAProxy's manager before it could stop HAProxy, whose
        # process outlived the test and held ports 8404/9101 against the next server's.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _submit(client, output: Path, **over) -> str:
    r = client.post("/v1/jobs", json={**JOB, **over, "output": output.as_uri()})
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def _wait(client, jid: str, until=lambda s: s["status"] not in ("queued", "running"), timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get(f"/v1/jobs/{jid}")
        assert r.status_code == 200, r.text
        if until(r.json()):
            return r.json()
        time.sleep(0.05)
    raise AssertionError(f"job {jid}: condition not met in {timeout} s; last {r.json()}")


def _shard_writers(session: int) -> list[int]:
    """PIDs of the bulk-job writer actors in the process session ``session`` (the server's: it
    was started in a session of its own; Ray titles actor processes ``ray::<class>``)."""
    return [pid for pid, (title, _) in session_processes(session).items() if title.startswith(b"ray::ShardWriter")]


def _shards(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((directory / "shards").iterdir())}


@pytest.fixture(scope="module")
def reference(served):
    client, outputs = served["client"], served["outputs"]
    status = _wait(client, _submit(client, outputs / "reference"))
    return status, outputs / "reference"


def test_a_16_shard_job_finishes_on_the_one_cpu_the_sampler_leaves(reference):
    status, output = reference
    assert (status["status"], status["done"]) == ("succeeded", 32_000), status
    # 2 CPUs, the replica that samples holds one: exactly one writer can be placed, and the job used it.
    assert status["writers"] == 1 and status["retries"] == 0, status
    assert status["manifest"]["totals"]["shards"] == 16
    bulk.verify(output.as_uri())


def test_a_killed_writer_is_replaced_and_the_job_ends_with_the_uninterrupted_bytes(served, reference):
    client, outputs = served["client"], served["outputs"]
    jid = _submit(client, outputs / "killed")
    # A job is "queued" before it is "running": only a finished shard proves a writer was placed.
    started = _wait(client, jid, until=lambda s: s["done"] > 0 or s["status"] not in ("queued", "running"))
    assert started["status"] == "running", f"the job ended before a writer could be killed: {started}"
    # Submitted right after the reference job ended, whose CPU the cluster's view still shows taken.
    assert started.get("writers") == 1, f"the job was not given the free CPU's writer: {started}"
    killed = _shard_writers(served["proc"].pid)
    assert killed, "no writer actor found to kill"
    for pid in killed:
        os.kill(pid, signal.SIGKILL)  # as the OOM killer would
    status = _wait(client, jid)
    assert (status["status"], status["done"]) == ("succeeded", 32_000), status
    assert status["retries"] >= 1, status
    assert _shards(outputs / "killed") == _shards(reference[1])
    assert status["manifest"]["shards"] == reference[0]["manifest"]["shards"]


def test_delete_cancels_a_running_job_within_seconds_keeping_its_finished_shards(served):
    client, outputs = served["client"], served["outputs"]
    jid = _submit(client, outputs / "cancelled", seed=12)
    _wait(client, jid, until=lambda s: s["done"] > 0)
    asked = time.monotonic()
    r = client.delete(f"/v1/jobs/{jid}")
    assert r.status_code == 202 and r.json()["cancel_requested"], r.text
    status = _wait(client, jid, timeout=15)
    took = time.monotonic() - asked
    print(f"cancelled {took:.2f} s after DELETE at {status['done']} of 32000")
    assert status["status"] == "cancelled" and 0 < status["done"] < 32_000, status
    assert took < 15, took
    kept = [p for p in (outputs / "cancelled" / "sidecars").glob("*.json")]
    assert kept and not (outputs / "cancelled" / "manifest.json").exists()
    # What was kept is valid: each sidecar's object hashes to it (a resume skips them).
    for sidecar in kept:
        record = json.loads(sidecar.read_text())
        data = (outputs / "cancelled" / record["key"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == record["sha256"]


def test_outputs_outside_the_output_root_are_refused_naming_no_file(served, tmp_path):
    client, outputs = served["client"], served["outputs"]
    (outputs / "link").parent.mkdir(parents=True, exist_ok=True)
    (outputs / "link").symlink_to(tmp_path)
    for output in (tmp_path.as_uri(), (outputs / ".." / "x").as_uri(), "file:///dev/shm/x", (outputs / "link" / "y").as_uri()):
        r = client.post("/v1/jobs", json={**JOB, "output": output})
        assert (r.status_code, r.json()["error"]) == (422, "invalid_request"), (output, r.text)
        (detail,) = r.json()["detail"]
        assert detail["loc"][-1] == "output" and str(tmp_path) not in detail["msg"] and "/dev/shm" not in detail["msg"]
        assert str(outputs) not in detail["msg"]
    assert not any(tmp_path.iterdir())


def _haproxy_api_answers() -> dict[str, int]:
    """Api server UP in HAProxy's backend -> 2xx answers HAProxy has had from it (its stats page)."""
    return {name: int(row["hrsp_2xx"] or 0) for name, row in haproxy_replicas(APP_NAME, "Api").items()
            if row["status"] == "UP"}


def _announced(output: list[str], timeout: float = 120.0) -> str:
    """The server's "serving ..." line, once it has printed it."""
    deadline = time.monotonic() + timeout
    while not (lines := [line for line in output if line.startswith("serving ")]):
        assert time.monotonic() < deadline, "".join(output)[-3000:]
        time.sleep(0.25)
    return lines[0]


def test_haproxy_ingress_samples_in_two_api_replicas_with_the_same_answers(served):
    """`genmodels serve --haproxy --sampling-replicas 2`: HAProxy in place of Serve's proxy, two Api
    replicas sampling themselves (holding both CPUs), both in HAProxy's backend by the time the server
    says it serves (Serve calls them ready 15-20 s earlier: until then requests took the backup path
    through Serve's proxy, to one replica), both answering concurrent requests; same images, the same
    JSON refusals, jobs through it (written in the Jobs replica: no CPU is left for a writer), and it
    stops as quickly."""
    body = {"n": 3, "seed": 5, "format": "array"}
    expected = served["client"].post(f"/v1/models/{MODEL}/samples", json=body)
    assert expected.status_code == 200, expected.text
    env = {**served["env"], "GENMODELS_WORK_DIR": str(served["root"] / "work-haproxy")}  # job records apart
    proc, client, output = _start_serve(served["root"], env, "--haproxy", "--sampling-replicas", "2")
    try:
        titles = [title for title, _ in session_processes(proc.pid).values()]
        assert any(b"haproxy" in title.split(b" ")[0] for title in titles), titles
        assert any(title.startswith(b"ray::HAProxyManager") for title in titles)  # Serve's proxy is its backup only
        assert len(serve_replicas(proc.pid, b"Api")) == 2, titles
        assert not any(b"genmodels:Sampler" in title or b"genmodels#Sampler" in title for title in titles)

        _announced(output)
        before = _haproxy_api_answers()
        assert len(before) == 2, (before, haproxy_replicas(APP_NAME, "Api"))
        # Requests at the same time: HAProxy's leastconn sends each to the replica with fewer in
        # flight, so both replicas answer, and each answers the same.
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: client.post(f"/v1/models/{MODEL}/samples", json=body), range(16)))
        for r in answers:
            assert r.status_code == 200, r.text
            assert (r.json()["images"], r.json()["version"]) == (expected.json()["images"], expected.json()["version"])
        deadline = time.monotonic() + 30  # the stats page lags the answers by a moment
        while not all((after := _haproxy_api_answers()).get(k, 0) > n for k, n in before.items()):
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        served_by = {server: after[server] - before.get(server, 0) for server in after}
        assert len(served_by) == 2 and all(served_by.values()), served_by
        refused = client.post(f"/v1/models/{MODEL}/samples", json={"n": 0})
        assert refused.status_code == 422 and refused.json()["error"] == "invalid_request", refused.text
        missing = client.post("/v1/models/no-such-model/samples", json={"n": 1})
        assert (missing.status_code, missing.json()["error"]) == (404, "model_not_found")

        outputs = served["root"] / "work-haproxy" / "store" / "outputs"
        status = _wait(client, _submit(client, outputs / "via-haproxy", n=4_000, seed=17))
        assert (status["status"], status["done"], status["writers"]) == ("succeeded", 4_000, 0), status

        asked = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        assert time.monotonic() - asked < 10
        assert not [t for t, _ in session_processes(proc.pid).values() if b"haproxy" in t.split(b" ")[0]]
    finally:
        _stop(proc, client)


def test_sigterm_stops_the_server_within_10_s_while_a_job_runs(served):
    client, outputs, proc = served["client"], served["outputs"], served["proc"]
    jid = _submit(client, outputs / "interrupted", seed=13)
    _wait(client, jid, until=lambda s: s["status"] == "running")
    asked = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # the server process only, as `docker stop` or `kill` would
    proc.wait(15)
    took = time.monotonic() - asked
    print(f"genmodels serve stopped {took:.1f} s after SIGTERM")
    assert took < 10, f"genmodels serve took {took:.1f} s to stop"
    # Serve itself stopped in its window (its replicas done, the job recorded cancelled by its own
    # replica), not Ray under replicas still stopping: while the replicas looked for their last
    # requests every 2 s, not 0.5, Ray was stopped under them in 2 of 4 runs here.
    assert "did not stop within" not in "".join(served["output"]), "".join(served["output"])[-2000:]
    # Its writers went with it (Ray stopped under them), within the same 10 s.
    while _shard_writers(proc.pid) and time.monotonic() - asked < 10:
        time.sleep(0.1)
    assert not _shard_writers(proc.pid)

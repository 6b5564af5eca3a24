"""The Serve application that ``build_app`` builds (inspected, not run: no Ray)."""

from __future__ import annotations

import pytest

from serving.app import build_app


def _deployments(app) -> dict[str, object]:
    """Every deployment bound into ``app``, by name: the ingress and those its arguments bind."""
    found, todo = {}, [app]
    while todo:
        deployment = todo.pop()._bound_deployment
        found[deployment.name] = deployment
        bound = (*deployment.init_args, *deployment.init_kwargs.values())
        todo += [a for a in bound if hasattr(a, "_bound_deployment")]
    return found


@pytest.fixture()
def args(tmp_path, monkeypatch):
    monkeypatch.setenv("GENMODELS_WORK_DIR", str(tmp_path))
    return {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_sampler_reserves_a_cpu_per_onnxruntime_thread(args, threads):
    # More threads than reserved CPUs spin on cores Ray hands to other work (job writers, replicas).
    deployments = _deployments(build_app({**args, "sampler_threads": threads, "sample_in_ingress": False}))
    assert set(deployments) == {"Api", "Sampler", "Jobs"}
    sampler = deployments["Sampler"]
    assert sampler.ray_actor_options["num_cpus"] == threads
    assert deployments["Api"].ray_actor_options["num_cpus"] == 0
    # What the decorator sets besides stays.
    assert sampler.max_ongoing_requests == 256


def test_a_sampling_ingress_reserves_a_cpu_per_onnxruntime_thread(args):
    deployments = _deployments(build_app({**args, "sampler_threads": 2, "sample_in_ingress": True}))
    assert set(deployments) == {"Api", "Jobs"}
    assert deployments["Api"].ray_actor_options["num_cpus"] == 2


# HAProxy's stats CSV as Ray Serve's HAProxy writes it (columns cut to those read): the frontend and
# backend summary rows, another application's replica, Serve's proxy as backup.
_STATS_CSV = """# pxname,svname,status,hrsp_2xx,
http_frontend,FRONTEND,OPEN,40,
genmodels,SERVE_REPLICA_genmodels-Api-a1,UP,12,
genmodels,SERVE_REPLICA_genmodels-Api-b2,{second},3,
genmodels,SERVE_REPLICA_genmodels-Jobs-c3,UP,1,
genmodels,SERVE_PROXY_ACTOR-0123,UP,25,
other,SERVE_REPLICA_other-Api-d4,UP,7,
genmodels,BACKEND,UP,41,
"""


@pytest.fixture()
def stats_page(monkeypatch):
    """A stats page on a free loopback port (RAY_SERVE_HAPROXY_STATS_PORT): set ``state["second"]``
    to the second Api replica's status; ``state["requests"]`` counts what was asked of it."""
    import http.server
    import threading

    state = {"second": "DOWN", "requests": 0}

    class Stats(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            state["requests"] += 1
            body = _STATS_CSV.format(second=state["second"]).encode()
            self.send_response(200 if self.path == "/stats;csv" else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stats)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", str(server.server_address[1]))
    yield state
    server.shutdown()
    server.server_close()


def test_haproxy_replicas_lists_one_deployments_replicas_with_their_rows(stats_page):
    from serving.app import haproxy_replicas

    replicas = haproxy_replicas("genmodels", "Api")
    assert {name: (row["status"], row["hrsp_2xx"]) for name, row in replicas.items()} == {
        "SERVE_REPLICA_genmodels-Api-a1": ("UP", "12"), "SERVE_REPLICA_genmodels-Api-b2": ("DOWN", "3")}
    assert set(haproxy_replicas("genmodels", "Jobs")) == {"SERVE_REPLICA_genmodels-Jobs-c3"}


def test_waiting_for_haproxy_routes_ends_when_enough_replicas_are_up(stats_page):
    import threading
    import time

    from serving.app import wait_for_haproxy_routes

    assert wait_for_haproxy_routes("genmodels", "Api", 1, timeout_s=0)
    started = time.monotonic()
    assert not wait_for_haproxy_routes("genmodels", "Api", 2, timeout_s=0.6)
    assert 0.6 <= time.monotonic() - started < 5 and stats_page["requests"] >= 3
    threading.Timer(0.5, stats_page.update, kwargs={"second": "UP"}).start()
    assert wait_for_haproxy_routes("genmodels", "Api", 2, timeout_s=10)


def test_waiting_for_haproxy_routes_outlasts_a_stats_page_not_up_yet(monkeypatch):
    import socket
    import time

    from serving.app import wait_for_haproxy_routes

    with socket.socket() as probe:  # a port nothing listens on: HAProxy not (re)started yet
        probe.bind(("127.0.0.1", 0))
        monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", str(probe.getsockname()[1]))
    started = time.monotonic()
    assert not wait_for_haproxy_routes("genmodels", "Api", 1, timeout_s=0.5)
    assert time.monotonic() - started >= 0.5


@pytest.mark.parametrize("interval", [float("inf"), 1e12])
def test_a_reload_interval_no_thread_can_wait_is_refused(args, interval):
    # The reload thread's Event.wait raised OverflowError on its first wait: no hot reload, silently.
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="reload_interval_s"):
        build_app({**args, "reload_interval_s": interval})
    build_app({**args, "reload_interval_s": 86400.0})

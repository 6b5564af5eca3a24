"""`genmodels serve`: the online API on the registry's champions. ``genmodels.cli`` finds
:func:`register` through the ``genmodels.cli`` entry point."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from genmodels.cli_options import console, friendly_errors
from genmodels.config import get_settings

#: How often ``--wait-for-champion`` asks the registry again.
CHAMPION_POLL_S = 5.0
#: The Serve application ``genmodels serve`` runs.
APP_NAME = "genmodels"
#: How long ``genmodels serve --haproxy`` waits, after Serve reports the replicas ready, for HAProxy
#: to route to them before it says it serves (15-20 s on 2 cores).
HAPROXY_ROUTES_WAIT_S = 60.0


class ProxyLocation(str, Enum):
    """Where Serve runs its HTTP proxies (Serve's own names)."""

    every_node = "EveryNode"
    head_only = "HeadOnly"


@friendly_errors
def serve_cmd(
    host: Annotated[str, typer.Option(help="HTTP host of the Serve proxy.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP port of the Serve proxy.")] = 8000,
    models: Annotated[Optional[str], typer.Option("--models", help="Comma list of registered models "
                                                  "(default: every model with a champion, and those that get one while serving).")] = None,
    reload_interval: Annotated[float, typer.Option("--reload-interval", min=0.1, help="Seconds between checks "
                                                   "of the champion alias (hot reload).")] = 10.0,
    metrics_port: Annotated[int, typer.Option("--metrics-port", min=1, max=65535, help="Prometheus metrics of the "
                                              "local Ray started here (Serve's and genmodels'), at "
                                              "http://127.0.0.1:PORT/metrics; a cluster (RAY_ADDRESS) sets its own "
                                              "with `ray start --metrics-export-port`.")] = 8080,
    wait_for_champion: Annotated[float, typer.Option("--wait-for-champion", min=0, metavar="SECONDS",
                                                     help="Wait up to SECONDS for the models to have a champion "
                                                     "(a stack started before its first retrain) instead of "
                                                     "failing at once.")] = 0.0,
    proxy_location: Annotated[ProxyLocation, typer.Option("--proxy-location", help="HTTP proxies on every Ray "
                                                          "node, or on the head only (several nodes sharing one "
                                                          "host would otherwise compete for the port).")]
    = ProxyLocation.every_node,
    num_cpus: Annotated[Optional[int], typer.Option("--num-cpus", min=1, help="CPUs of the local Ray started here "
                                                    "(default: the machine's; each replica that samples reserves one, bulk "
                                                    "job writers (up to 2 a job) take what is left); ignored with RAY_ADDRESS.")]
    = None,
    sampling_replicas: Annotated[int, typer.Option("--sampling-replicas", min=1, help="Replicas that sample "
                                                   "(the Sampler's, or with --haproxy the Api's), one CPU each; "
                                                   "CPUs they leave go to bulk-job writers, up to 2 a job (none left: jobs are "
                                                   "written in the server, more slowly).")] = 1,
    haproxy: Annotated[bool, typer.Option("--haproxy", help="Ray Serve's HAProxy ingress instead of its Python "
                                          "HTTP proxy, the Api replicas sampling: about 6x less CPU per small request (needs an haproxy "
                                          "binary; one such server per machine: HAProxy keeps its files in "
                                          "/tmp/haproxy-serve, and its stats page and metrics listen on every "
                                          "interface, ports 8404 and 9101 unless RAY_SERVE_HAPROXY_STATS_PORT / "
                                          "RAY_SERVE_HAPROXY_METRICS_PORT say otherwise). Local Ray "
                                          "only: a cluster sets "
                                          "RAY_SERVE_ENABLE_HA_PROXY=1 on its nodes.")] = False,
) -> None:
    """The online sampling API (Ray Serve) on the champions of the MLflow registry; blocks until
    Ctrl-C or SIGTERM (then stops within seconds, running bulk jobs cancelled with their finished
    shards kept). Local Ray unless RAY_ADDRESS; MLFLOW_TRACKING_URI as for retrain."""
    import os
    import signal
    import time

    from genmodels import registry
    from genmodels.ray_runtime import ensure_ray

    local_ray = not os.environ.get("RAY_ADDRESS")
    if haproxy and not local_ray:
        # Serve reads it when each node's Ray starts: setting it here would change nothing there,
        # and the ingress would sample behind a proxy it is not meant for.
        raise ValueError("--haproxy starts HAProxy with the local Ray only; on a cluster (RAY_ADDRESS) set "
                         "RAY_SERVE_ENABLE_HA_PROXY=1 in the environment of `ray start` on every node")

    # Check the registry before starting Ray: a typo or an empty registry is one clear line.
    registry.configure()
    deadline = time.monotonic() + wait_for_champion
    while True:
        names = [m.strip() for m in models.split(",") if m.strip()] if models else registry.served_models()
        missing = [n for n in names if registry.current_version(n) is None]
        if names and not missing:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            if not names:
                raise ValueError("no registered model has a champion yet: run `genmodels retrain` first")
            raise ValueError(f"no champion version for {missing}; served models with one: "
                             f"{registry.served_models()}")
        with console.status(f"waiting for a champion ({'every model' if models else 'any model'}; "
                            f"{left:.0f} s left)"):
            time.sleep(min(CHAMPION_POLL_S, left))

    from ray import serve

    from serving.app import build_app, use_serve_env, wait_for_haproxy_routes

    use_serve_env(haproxy=haproxy)
    if local_ray:
        _check_ports_free(host, port, metrics_port, haproxy)
    ensure_ray(num_cpus=num_cpus, metrics_export_port=metrics_port)
    if local_ray:
        _check_cpus_for_replicas(sampling_replicas)
    # SIGTERM (docker stop, systemd, kill) takes the same way out as Ctrl-C; set after ray.init,
    # which installs a handler of its own.
    signal.signal(signal.SIGTERM, _interrupt)
    serve.start(proxy_location=proxy_location.value, http_options={"host": host, "port": port})
    with console.status(f"loading {', '.join(names)}"):
        serve.run(build_app({"models": names if models else None, "reload_interval_s": reload_interval,
                             "sampling_replicas": sampling_replicas}), name=APP_NAME,
                  route_prefix="/")
    if haproxy:
        with console.status(f"waiting for HAProxy to route to the {sampling_replicas} Api replica(s)"):
            routed = wait_for_haproxy_routes(APP_NAME, "Api", sampling_replicas, HAPROXY_ROUTES_WAIT_S)
        if not routed:
            console.print(f"[yellow]HAProxy does not route to every Api replica after {HAPROXY_ROUTES_WAIT_S:.0f} s; "
                          "until it does, requests go through Serve's proxy (its backup), more slowly")
    base = f"http://{host}:{port}"
    auth = ' -H "Authorization: Bearer $GENMODELS_API_KEY"' if get_settings().api_key else ""
    console.print(f"serving {', '.join(names)} at {base} (OpenAPI: {base}/docs); Ctrl-C stops\n"
                  f"  curl{auth} {base}/v1/models\n"
                  f"  curl{auth} -X POST {base}/v1/models/{names[0]}/samples -H 'content-type: application/json' "
                  f"-d '{{\"n\": 4, \"seed\": 0}}'\n"
                  f"  curl{auth} -o grid.png '{base}/v1/models/{names[0]}/grid.png?n=16&seed=0'")
    if local_ray:
        console.print(f"Prometheus metrics: http://127.0.0.1:{metrics_port}/metrics (ray_serve_*, ray_genmodels_*)")
    try:
        _sweep_until_interrupted()
    except KeyboardInterrupt:
        console.print("stopping")
    finally:
        _stop_within(SHUTDOWN_S)


def _check_cpus_for_replicas(sampling_replicas: int) -> None:
    """Refuse more sampling replicas than the local Ray has CPUs for: a replica Ray cannot place
    stays pending, and ``serve.run`` waits for it forever without a word (Serve's warnings go to
    its own log)."""
    import ray

    from serving.app import DEFAULTS

    need = sampling_replicas * DEFAULTS["sampler_threads"]
    cpus = ray.cluster_resources().get("CPU", 0)
    if need > cpus:
        raise ValueError(f"--sampling-replicas {sampling_replicas} needs {need} CPUs (one each) and the local Ray "
                         f"has {cpus:g}: lower it or raise --num-cpus")


#: Ray Serve's variable for the port of HAProxy's Prometheus exporter, and its default.
HAPROXY_METRICS_PORT_ENV, HAPROXY_METRICS_PORT_DEFAULT = "RAY_SERVE_HAPROXY_METRICS_PORT", 9101


def _check_ports_free(host: str, port: int, metrics_port: int, haproxy: bool) -> None:
    """Refuse, before the local Ray starts, a port something on this machine already listens on.
    Otherwise Serve's proxy (or HAProxy) fails to bind only once Ray is up, with a traceback of
    Ray's, and a taken metrics port keeps Ray's node from starting at all: Ray gives up after
    about 40 s with "timed out during startup", naming no port."""
    import os

    from serving.app import HAPROXY_STATS_PORT_DEFAULT, HAPROXY_STATS_PORT_ENV

    wanted = [("--host/--port", host, port), ("--metrics-port", "", metrics_port)]  # Ray's agent: every interface
    if haproxy:
        # HAProxy's stats page and exporter listen on every interface: one such server per machine.
        wanted += [(env, "", int(os.environ.get(env, default))) for env, default in (
            (HAPROXY_STATS_PORT_ENV, HAPROXY_STATS_PORT_DEFAULT),
            (HAPROXY_METRICS_PORT_ENV, HAPROXY_METRICS_PORT_DEFAULT))]
    for option, address, number in wanted:
        _check_port_free(option, address, number)


def _check_port_free(option: str, host: str, port: int) -> None:
    import errno
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host or "0.0.0.0", port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            # As the servers bind theirs: a port whose last connections linger in TIME_WAIT is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        why = "already in use (another genmodels serve?)" if exc.errno == errno.EADDRINUSE else exc.strerror or exc
        raise OSError(f"{option} {port}: cannot listen on {host or '0.0.0.0'}:{port}: {why}") from None


#: How often a running ``genmodels serve`` looks for Ray workers stuck in their own exit.
DEPARTED_WORKER_SWEEP_S = 60.0


def _sweep_until_interrupted(interval_s: float = DEPARTED_WORKER_SWEEP_S) -> None:
    """Block until Ctrl-C / SIGTERM; meanwhile kill, every ``interval_s``, the local Ray's workers
    stuck in their exit (:func:`genmodels.ray_runtime.reap_departed_workers`): each bulk job's
    writers are actors that end, and a server runs for weeks."""
    import time

    from genmodels.ray_runtime import reap_departed_workers

    while True:
        time.sleep(interval_s)
        reap_departed_workers()


#: How long ``genmodels serve`` gives Serve to stop its replicas before it stops Ray under them.
SHUTDOWN_S = 4.0


def _interrupt(signum, frame) -> None:
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM stops at once
    raise KeyboardInterrupt


def _stop_within(seconds: float) -> None:
    """``serve.shutdown()`` (replicas stop: the Jobs one cancels its jobs), bounded: a replica that
    does not stop in time is taken down with the local Ray (:func:`genmodels.ray_runtime.stop_ray`)."""
    import threading

    from ray import serve

    from genmodels.ray_runtime import stop_ray

    done = threading.Thread(target=serve.shutdown, daemon=True, name="genmodels-serve-shutdown")
    done.start()
    done.join(seconds)
    if done.is_alive():
        console.print(f"Serve did not stop within {seconds:.0f} s; stopping Ray")
    stop_ray()


def register(app: typer.Typer) -> None:
    """Add these commands to ``app`` (the ``genmodels`` command, through the ``genmodels.cli`` entry point)."""
    app.command("serve")(serve_cmd)

"""Connecting to Ray: what training on Ray, bulk jobs and serving share, without torch or the
training loop."""

from __future__ import annotations

import os


def ensure_ray(address: str | None = None, num_cpus: int | None = None, metrics_export_port: int | None = None) -> None:
    """Connect to the cluster at ``address`` / ``RAY_ADDRESS``, or start a local one; a local one
    serves Prometheus metrics at ``127.0.0.1:<metrics_export_port>/metrics`` when given (a cluster's
    port is set by its own ``ray start --metrics-export-port``)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        # A private local cluster: no token auth to configure (see shared/STACK_NOTES.md).
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 _metrics_export_port=metrics_export_port)
    else:
        ray.init(address=address, log_to_driver=False)



def call_in_worker(fn, *args, num_cpus: int, **kwargs):
    """``fn(*args, **kwargs)`` in a Ray worker process that holds ``num_cpus`` CPUs and uses as
    many torch threads, and its result. For work that keeps state in its process (torch's global
    RNG, its thread pool) running beside other such work: each call has a process to itself.
    ``fn`` must be importable by the workers (a module-level function of this package)."""
    import ray

    ensure_ray()
    remote = ray.remote(num_cpus=num_cpus, max_retries=0)(_call_with_threads)
    return ray.get(remote.remote(fn, num_cpus, args, kwargs))


def _call_with_threads(fn, threads: int, args, kwargs):
    import torch

    torch.set_num_threads(threads)
    return fn(*args, **kwargs)

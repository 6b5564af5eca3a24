"""Connecting to Ray: what training on Ray, bulk jobs and serving share, without torch or the
training loop."""

from __future__ import annotations

import os

#: Ray Train's controller poll interval, set for the local cluster this process starts (a value
#: already in the environment wins; a cluster's controllers read their own environment).
TRAIN_POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
LOCAL_TRAIN_POLL_INTERVAL_S = "0.5"


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
        # Ray Train's controller notices a report, a checkpoint or a finished worker only when it
        # polls (every 2 s by default), and a worker's next report waits for it: the quick mixture's
        # train_on_ray took 31-34 s for 3 s of epochs, 16-19 s polling every 0.5 s. A poll that
        # outlasts the interval is not an error (the worker fails only after 10 minutes of them).
        os.environ.setdefault(TRAIN_POLL_INTERVAL_ENV, LOCAL_TRAIN_POLL_INTERVAL_S)
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 _metrics_export_port=metrics_export_port)
    else:
        ray.init(address=address, log_to_driver=False)

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

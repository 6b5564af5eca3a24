"""Prefect flows: thin orchestration over `genmodels` (data prep, Ray training, evaluation,
ONNX export, MLflow registration, promotion). Each task calls one `genmodels` function; the
flows only order them, retry what can fail transiently and record inputs and outputs."""

import os

#: Settings of the temporary Prefect server a process starts for itself when no PREFECT_API_URL
#: is set (embedded mode), so that a normal `make run` prints no ERROR and no traceback:
#: - analytics: the server's telemetry call fails with an ERROR line on machines without internet;
#: - triggers: the automations service (automations need a real server) sweeps and reconciles in
#:   SQLite every few seconds, racing the flow's own writes; its failures ("database is locked")
#:   are logged with a traceback (prefect.server.events.triggers, Prefect 3.9), unlike the API's,
#:   which Prefect already filters;
#: - startup timeout: the default 20 s ran out on 2 busy cores (measured: 28 s from start to the first flow run while tests ran).
#: Explicit settings win; a Prefect server (PREFECT_API_URL) is left as configured.
EMBEDDED_PREFECT_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def use_embedded_prefect_defaults() -> None:
    """:data:`EMBEDDED_PREFECT_ENV` when no PREFECT_API_URL is set; before Prefect is imported,
    as this package's modules import it (Prefect reads its settings from the environment)."""
    if os.environ.get("PREFECT_API_URL"):
        return
    for key, value in EMBEDDED_PREFECT_ENV.items():
        os.environ.setdefault(key, value)


use_embedded_prefect_defaults()

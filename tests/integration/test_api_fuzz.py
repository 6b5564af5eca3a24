"""schemathesis, a client no one here wrote, against the served ``/openapi.json``: every route of
HTTP API v1 on real Ray Serve over 127.0.0.1, with auth off, with auth on and the key, and with
auth on and no key. No input it makes may get a 5xx.

Tiny champions of two families are served: the CVAE has every route but completion (samples,
grids, interpolations, analogies, jobs), the mixture has completion; bulk
jobs are capped at a few thousand samples so that accepted fuzz jobs end in seconds.

The schema is the served one (serving.api.openapi): model names per route, classes, sizes, the
job output roots and an example request per operation, so that generated requests reach the
routes' work and not only their refusals; each POST route must accept some of them.

Each run is bounded in time (``--max-time``: schemathesis fuzzes until it is spent) and in
examples per operation; its HAR report says what was sent and answered. The share of generated
requests each route accepted (2xx) is printed (``-s``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from registry_fixtures import registry_env
from serving_fixtures import deploy, register_champions, serve_on_free_port

pytestmark = pytest.mark.slow
httpx = pytest.importorskip("httpx")
pytest.importorskip("schemathesis")

DATASET = "fz"
FAMILIES = ("cvae", "mixture")
MODELS = [f"{DATASET}-{f}" for f in FAMILIES]
KEY = "fuzz-key-0123"
SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")  # the venv's console script
# Examples per operation and phase, and seconds per run (schemathesis fuzzes until they are
# spent: with 150 s the module took 9 minutes on 2 shared cores, at ~23 requests/s). The examples
# phase comes first, so every route's accepted example is sent whatever the load.
MAX_EXAMPLES = {"off": 8, "on": 5, "no-key": 3}
MAX_TIME = {"off": 30, "on": 15, "no-key": 6}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    with registry_env(root) as tracking_uri, pytest.MonkeyPatch.context() as mp:
        # Read by the Jobs replica (Ray's workers inherit the environment of the process that
        # starts Ray): jobs write under <root>/work/store/outputs/ and stay small.
        mp.setenv("GENMODELS_WORK_DIR", str(root / "work"))
        mp.setenv("GENMODELS_JOB_MAX_SAMPLES", "4096")
        mp.setenv("GENMODELS_MAX_ACTIVE_JOBS", "1")
        register_champions(root, DATASET, FAMILIES, metrics={f: {"nll_nats": 40.0} for f in FAMILIES})
        with serve_on_free_port(tracking_uri, MODELS) as url:
            yield {"url": url, "root": root, "tracking_uri": tracking_uri}


def _fuzz(url: str, tmp: Path, mode: str, *headers: str) -> dict[str, Counter]:
    """One schemathesis run; per operation ``"METHOD /path"``: a Counter of answered statuses."""
    har = tmp / f"{mode}.har"
    args = [SCHEMATHESIS, "run", f"{url}/openapi.json",
            "--checks", "not_a_server_error", "--max-examples", str(MAX_EXAMPLES[mode]), "--max-time", str(MAX_TIME[mode]),
            "--seed", "12", "--workers", "1", "--request-timeout", "60", "--generation-database", "none",
            "--report", "har", "--report-har-path", str(har), "--no-color"]
    for header in headers:
        args += ["--header", header]
    began = time.monotonic()
    done = subprocess.run(args, capture_output=True, text=True, timeout=MAX_TIME[mode] + 120, cwd=tmp)
    print(done.stdout[-3000:], f"\n{mode}: schemathesis ran {time.monotonic() - began:.0f} s")
    assert done.returncode == 0, f"schemathesis found failures ({mode}):\n{done.stdout[-8000:]}\n{done.stderr[-2000:]}"
    return _statuses(json.loads(har.read_text()), httpx.get(f"{url}/openapi.json", timeout=30).json())


def _statuses(har: dict, spec: dict) -> dict[str, Counter]:
    routes = [(method.upper(), path, re.compile("^" + re.sub(r"\{[^/]+\}", "[^/]+", re.escape(path)
                                                               .replace(r"\{", "{").replace(r"\}", "}")) + "$"))
              for path, item in spec["paths"].items() for method in item]
    out: dict[str, Counter] = defaultdict(Counter)
    for entry in har["log"]["entries"]:
        method, target = entry["request"]["method"], httpx.URL(entry["request"]["url"]).path
        name = next((f"{m} {p}" for m, p, rx in routes if m == method and rx.match(target)), f"{method} (other)")
        out[name][entry["response"]["status"]] += 1
    return dict(out)


def _report(mode: str, statuses: dict[str, Counter]) -> dict[str, float]:
    """The share of requests each operation accepted (2xx), printed; and the shares."""
    shares = {}
    print(f"\nauth {mode}: requests and the share accepted (2xx), per operation")
    for name in sorted(statuses):
        counts = statuses[name]
        total = sum(counts.values())
        shares[name] = sum(v for k, v in counts.items() if 200 <= k < 300) / total
        print(f"  {name:45s} {total:5d}  {shares[name]:6.1%}  {dict(sorted(counts.items()))}")
    return shares


def _no_server_error(statuses: dict[str, Counter]) -> None:
    faults = {name: {k: v for k, v in counts.items() if k >= 500} for name, counts in statuses.items()}
    assert not any(faults.values()), faults


def test_no_input_gets_a_5xx_with_auth_off(served, tmp_path):
    statuses = _fuzz(served["url"], tmp_path, "off")
    _no_server_error(statuses)
    # Every operation of the schema was exercised, and with more than a handful of inputs.
    spec = httpx.get(f"{served['url']}/openapi.json", timeout=30).json()
    operations = {f"{m.upper()} {p}" for p, item in spec["paths"].items() for m in item}
    assert operations <= set(statuses), operations - set(statuses)
    assert sum(sum(c.values()) for c in statuses.values()) > 20 * len(operations)
    # The served schema leads generated requests past validation on every route that does work.
    shares = _report("off", statuses)
    for route in ("samples", "interpolate", "analogies", "complete"):
        assert shares[f"POST /v1/models/{{name}}/{route}"] > 0, (route, statuses)
    assert shares["POST /v1/jobs"] > 0, statuses


def test_no_input_gets_a_5xx_with_auth_on(served, tmp_path):
    deploy(served["tracking_uri"], MODELS, api_key=KEY)
    try:
        client = httpx.Client(base_url=served["url"], timeout=60)
        assert client.get("/v1/models").status_code == 401  # the new deployment is the one answering
        with_key = _fuzz(served["url"], tmp_path, "on", f"Authorization: Bearer {KEY}")
        _report("on, with the key", with_key)
        _no_server_error(with_key)
        assert sum(c[200] + c[202] for c in with_key.values()) > 0  # the key got requests through

        without = _fuzz(served["url"], tmp_path, "no-key")
        _report("on, without a key", without)
        _no_server_error(without)
        v1 = {name: counts for name, counts in without.items() if " /v1/" in name}
        # Without the key nothing under /v1 is answered but a refusal before the route's work.
        assert v1 and all(set(counts) <= {401, 404, 405, 413, 400} for counts in v1.values()), v1
        assert all(counts[401] > 0 for counts in v1.values()), v1
    finally:
        deploy(served["tracking_uri"], MODELS)

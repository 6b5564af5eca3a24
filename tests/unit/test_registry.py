"""The MLflow registry gate on a real MLflow (sqlite in a temp dir), with tiny real models.

Models are trained once per module on digits, in-process (no Ray, no Prefect): three VAEs of
increasing quality on one test snapshot, one VAE on a snapshot split with another seed, and a
tiny CVAE for the conditional pyfunc. Each test registers under its own dataset name, so the
registered models (``<dataset>-<family>``) of different tests never see each other.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from genmodels import registry, runs
from genmodels.data import PrepConfig
from genmodels.evaluation import evaluation_settings
from genmodels.storage import open_storage
from registry_fixtures import registry_env

TINY = {"latent_dim": 3, "hidden": (16,)}


@dataclass
class Trained:
    family: str
    run: Any  # Storage of the run
    metrics: dict[str, float]
    snapshot_hash: str

    @property
    def gate_value(self) -> float:
        return self.metrics[registry.gate_metric(self.family)]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """MLflow on sqlite in a fresh directory for the module, a file store, two test snapshots."""
    root = tmp_path_factory.mktemp("registry")
    with registry_env(root):
        store = open_storage(root / "store")
        snapshots = {seed: runs.snapshot_for(store, "digits", None, PrepConfig(seed=seed)) for seed in (0, 1)}
        assert snapshots[0].hash != snapshots[1].hash
        yield {"root": root, "store": store, "snapshots": snapshots, "artifact_root": (root / "mlflow").as_uri()}


@pytest.fixture(scope="module")
def models(work) -> dict[str, Trained]:
    store, snaps = work["store"], work["snapshots"]

    def train(key: str, family: str, seed: int, epochs: int, examples: int | None) -> Trained:
        # Each model gets its own storage root: runs of one family and preset share a prefix,
        # and a second training there would resume the first.
        outcome = runs.train_family(store.child(f"models/{key}"), snaps[seed], family, "quick",
                                    overrides={"epochs": epochs, "max_train_examples": examples, "seed": 0},
                                    model_overrides=TINY)
        metrics = runs.evaluate_run(store, outcome.run, snaps[seed], "quick")  # classifier cached in `store`
        runs.export_run(outcome.run)
        return Trained(family, outcome.run, metrics, snaps[seed].hash)

    trained = {
        "worst": train("worst", "vae", 0, 1, 64),
        "mid": train("mid", "vae", 0, 2, None),
        "best": train("best", "vae", 0, 8, None),
        "other_snapshot": train("other", "vae", 1, 2, 512),
        "cvae": train("cvae", "cvae", 0, 1, 256),
    }
    worst, mid, best = (trained[k].gate_value for k in ("worst", "mid", "best"))
    # The gate tests below mean something only if more training gave a clearly better NLL.
    assert worst > mid + 0.5 and mid > best + 0.5, (worst, mid, best)
    return trained


def register(work, model: Trained, dataset: str, metrics: dict[str, float] | None = None,
             family: str | None = None, preset: str = "quick") -> registry.Registered:
    """What ``pipelines.tasks.register`` passes, from a run in storage."""
    loaded, meta = runs.load_model(model.run)
    with tempfile.TemporaryDirectory() as tmp:
        return registry.register(
            dataset=dataset, family=family or model.family, preset=preset, checkpoint=model.run.get_bytes("model.pt"),
            onnx_files=runs.fetch_onnx(model.run, tmp), metrics=model.metrics if metrics is None else metrics,
            params={"family": model.family, "model": {k: v for k, v in loaded.config.to_dict().items() if k != "image"},
                    "train": meta["train_config"]},
            snapshot_hash=meta["snapshot_hash"], artifact_root=work["artifact_root"],
            artifacts={"metrics.json": model.run.get_bytes("metrics.json")},
            history=json.loads(model.run.get_bytes("history.json")),
            feature_network=runs.evaluation_record(model.run).get("feature_network"),
        )


def alias_version(name: str, alias: str) -> str | None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def versions(name: str) -> list[str]:
    from mlflow import MlflowClient

    return sorted(str(mv.version) for mv in MlflowClient().search_model_versions(f"name='{name}'"))


def test_each_evaluation_records_the_networks_its_figures_were_measured_with(work, models):
    from mlflow import MlflowClient

    from genmodels.evaluation.classifier import class_judge_config, load_or_train_classifier
    from genmodels.models import weights_digest

    store, snapshot = work["store"], work["snapshots"][0]
    cached = load_or_train_classifier(snapshot, store)  # what the runs' evaluations cached
    assert cached.from_cache
    domain = weights_digest(cached.network)
    judge_config = class_judge_config(snapshot.image)
    judge = domain if judge_config is None else weights_digest(
        load_or_train_classifier(snapshot, store, judge_config, name="class-judge").network)
    assert runs.evaluation_record(models["mid"].run) == {"settings": evaluation_settings("quick"), "seed": 0,
                                                          "feature_network": domain}
    assert runs.evaluation_record(models["cvae"].run) == {"settings": evaluation_settings("quick"), "seed": 0,
                                                           "feature_network": domain, "class_judge": judge}
    # Another snapshot's figures were measured in its own classifier's features.
    assert runs.evaluation_record(models["other_snapshot"].run)["feature_network"] != domain
    reg = register(work, models["mid"], "provenance")
    assert MlflowClient().get_model_version(reg.name, reg.version).tags[registry.FEATURE_NETWORK_TAG] == domain


def test_a_champion_is_reevaluated_as_the_candidate_was_or_not_at_all(work, models):
    from genmodels.evaluation.classifier import load_or_train_classifier
    from genmodels.models import weights_digest

    store, snapshots = work["store"], work["snapshots"]
    champion = models["mid"]
    checkpoint = champion.run.get_bytes("model.pt")
    network = weights_digest(load_or_train_classifier(snapshots[0], store).network)
    tags = {"genmodels.dataset": "digits", "genmodels.snapshot_hash": champion.snapshot_hash,
            "genmodels.gate_metric": "fid"}

    # On its own snapshot, in the candidate's classifier's features: the figure its evaluation gave.
    value, why_not = runs.reevaluate_champion(store, snapshots[0], checkpoint, tags, "quick", feature_network=network)
    assert (value, why_not) == (pytest.approx(champion.metrics["fid"], rel=1e-6), "")
    # A candidate whose FID was measured with another classifier, or with one not recorded: no figure.
    for other in ("0" * 64, None):
        value, why_not = runs.reevaluate_champion(store, snapshots[0], checkpoint, tags, "quick", feature_network=other)
        assert value is None and "other domain-classifier features" in why_not
    # An NLL is the same in any classifier's features.
    value, why_not = runs.reevaluate_champion(store, snapshots[0], checkpoint, {**tags, "genmodels.gate_metric":
                                              "nll_nats"}, "quick", feature_network="0" * 64)
    assert (value, why_not) == (pytest.approx(champion.metrics["nll_nats"], rel=1e-6), "")
    # Scored on another split of digits, whose test images it partly trained on: optimistic.
    value, why_not = runs.reevaluate_champion(store, snapshots[1], checkpoint, tags, "quick", feature_network=network)
    assert value is None and "trained on some of the candidate's test images" in why_not
    # Its snapshot is gone from the storage: that cannot be checked.
    gone = {**tags, "genmodels.snapshot_hash": "f" * 64}
    value, why_not = runs.reevaluate_champion(store, snapshots[0], checkpoint, gone, "quick", feature_network=network)
    assert value is None and "cannot be checked" in why_not


def test_a_champions_reevaluation_runs_where_the_candidates_did_and_resumes_after_a_kill(work, models,
                                                                                           monkeypatch):
    """The champion's pass runs on the device a candidate's evaluation picks (it ran on the CPU
    beside an idle GPU: hours at k=5000, holding the promotion lease), and keeps its progress: a
    promote task killed mid-pass continues from its last batch, to the same figure."""
    from genmodels.evaluation.likelihood import PROGRESS_KEY
    from genmodels.models.vae import VAE

    store, champion = work["store"], models["mid"]
    checkpoint = champion.run.get_bytes("model.pt")
    tags = {"genmodels.dataset": "digits", "genmodels.snapshot_hash": champion.snapshot_hash,
            "genmodels.gate_metric": "nll_nats"}
    asked, resolve = [], runs.resolve_device
    monkeypatch.setattr(runs, "resolve_device", lambda name: asked.append(name) or resolve(name))
    calls, iwae = [], VAE.iwae

    def killed_at_the_second_batch(self, *args, **kwargs):
        calls.append(len(args[0]))
        if len(calls) == 2:
            raise KeyboardInterrupt("the promote task's worker was stopped")
        return iwae(self, *args, **kwargs)

    record = store.child(f"{runs.REEVALUATIONS_PREFIX}/{registry.model_digest(checkpoint)}")
    record.delete(PROGRESS_KEY)  # another test's re-evaluation of this champion on the same snapshot
    monkeypatch.setattr(VAE, "iwae", killed_at_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        runs.reevaluate_champion(store, work["snapshots"][0], checkpoint, tags, "quick")
    assert asked == ["auto"]
    first = calls[0]
    assert record.get_json(PROGRESS_KEY)["next"] == first
    calls.clear()
    monkeypatch.setattr(VAE, "iwae", lambda self, *a, **k: calls.append(len(a[0])) or iwae(self, *a, **k))
    value, why_not = runs.reevaluate_champion(store, work["snapshots"][0], checkpoint, tags, "quick")
    assert (value, why_not) == (pytest.approx(champion.metrics["nll_nats"], rel=1e-6), "")
    assert sum(calls) == len(work["snapshots"][0].splits["test"].y) - first  # the first batch not scored again


# --- the gate on one test snapshot ----------------------------------------------------------------
@pytest.fixture(scope="module")
def gate(work, models):
    """mid, then worst, then best registered and promoted in turn under ``gate-vae``; the
    decision and the aliases after each step."""
    steps = {}
    for key in ("mid", "worst", "best"):
        reg = register(work, models[key], "gate")
        assert reg.created
        promotion = registry.promote(reg.name, reg.version)
        steps[key] = {"registered": reg, "promotion": promotion,
                      "aliases": (alias_version(reg.name, "champion"), alias_version(reg.name, "challenger"))}
    return steps


def test_first_version_becomes_champion(gate, models):
    reg, promo = gate["mid"]["registered"], gate["mid"]["promotion"]
    assert (reg.name, reg.version, reg.gate_metric) == ("gate-vae", "1", "nll_nats")
    assert reg.gate_value == models["mid"].gate_value
    assert (promo.alias, promo.previous_champion, promo.champion_value) == ("champion", None, None)
    assert promo.reason == "no champion yet"
    assert gate["mid"]["aliases"] == ("1", None)
    from mlflow import MlflowClient

    assert MlflowClient().get_model_version("gate-vae", "1").tags[registry.PROMOTED_OVER_TAG] == ""  # replaced nobody


def test_worse_version_becomes_challenger_and_champion_stays(gate, models):
    promo = gate["worst"]["promotion"]
    assert (promo.version, promo.alias, promo.previous_champion) == ("2", "challenger", "1")
    assert promo.candidate_value == models["worst"].gate_value
    assert promo.champion_value == models["mid"].gate_value
    assert "does not beat champion v1" in promo.reason and "same test snapshot" in promo.reason
    assert gate["worst"]["aliases"] == ("1", "2")


def test_better_version_takes_champion(gate, models):
    promo = gate["best"]["promotion"]
    assert (promo.version, promo.alias, promo.previous_champion) == ("3", "champion", "1")
    assert promo.champion_value == models["mid"].gate_value
    assert promo.candidate_value == models["best"].gate_value < promo.champion_value
    assert "< champion v1" in promo.reason
    assert gate["best"]["aliases"] == ("3", "2")
    assert alias_version("gate-vae", "champion") == "3"


def test_promoting_the_champion_again_moves_nothing(gate):
    before = (alias_version("gate-vae", "champion"), alias_version("gate-vae", "challenger"))
    promo = registry.promote("gate-vae", "3")
    assert (promo.alias, promo.reason) == ("champion", "already the champion")
    # The version it replaced when it took the alias (v1), as the first promotion reported, not itself.
    assert promo.previous_champion == gate["best"]["promotion"].previous_champion == "1"
    assert promo.candidate_value == promo.champion_value
    assert (alias_version("gate-vae", "champion"), alias_version("gate-vae", "challenger")) == before == ("3", "2")


def test_same_checkpoint_registered_again_returns_the_existing_version(work, gate, models):
    again = register(work, models["mid"], "gate")
    first = gate["mid"]["registered"]
    assert again.created is False
    assert (again.version, again.run_id, again.model_digest) == (first.version, first.run_id, first.model_digest)
    assert versions("gate-vae") == ["1", "2", "3"]
    # No extra MLflow run either: one run per registered version.
    from mlflow import MlflowClient

    experiment = MlflowClient().get_experiment_by_name("gate")
    assert len(MlflowClient().search_runs([experiment.experiment_id])) == 3


def test_the_same_checkpoint_measured_again_reports_the_figure_its_version_holds(work, gate, models):
    # A re-run evaluates the same model again (another device's IWAE draws, a retrained domain
    # classifier): the version, and the promotion reading its tags, keep the first figure, so the
    # outcome reported with the promotion's reason must be that one too.
    first = gate["mid"]["registered"]
    again = register(work, models["mid"], "gate", metrics={**models["mid"].metrics, "nll_nats": first.gate_value + 5.0})
    assert (again.created, again.version) == (False, first.version)
    assert again.gate_value == first.gate_value


def test_version_carries_digest_snapshot_and_gate_tags(gate, models):
    from mlflow import MlflowClient

    reg = gate["best"]["registered"]
    mv = MlflowClient().get_model_version(reg.name, reg.version)
    assert mv.tags["genmodels.model_digest"] == registry.model_digest(models["best"].run.get_bytes("model.pt"))
    assert mv.tags["genmodels.snapshot_hash"] == models["best"].snapshot_hash
    assert float(mv.tags["genmodels.gate_value"]) == models["best"].gate_value
    assert mv.tags["genmodels.git_commit"] == "0123456789abcdef"
    assert json.loads(mv.tags["genmodels.evaluation"]) == evaluation_settings("quick")


# --- another test snapshot ------------------------------------------------------------------------
def test_champion_of_another_snapshot_is_only_replaced_when_reevaluated(work, models):
    champ = register(work, models["best"], "resplit")
    assert registry.promote(champ.name, champ.version).alias == "champion"
    candidate = register(work, models["other_snapshot"], "resplit")
    assert candidate.snapshot_hash != champ.snapshot_hash

    # Without a way to re-evaluate, metrics on different test data are not compared.
    kept = registry.promote(candidate.name, candidate.version)
    assert (kept.alias, kept.previous_champion, kept.champion_value) == ("challenger", "1", None)
    assert "another test snapshot" in kept.reason and "champion kept" in kept.reason
    assert (alias_version("resplit-vae", "champion"), alias_version("resplit-vae", "challenger")) == ("1", "2")

    # Re-evaluated on the candidate's snapshot, the champion scores worse: the candidate wins.
    asked = []
    worse = models["other_snapshot"].gate_value + 5.0

    def reevaluate_worse(mv) -> float:
        asked.append(str(mv.version))
        return worse

    won = registry.promote(candidate.name, candidate.version, reevaluate=reevaluate_worse)
    assert asked == ["1"]  # called with the champion's version
    assert (won.alias, won.previous_champion, won.champion_value) == ("champion", "1", worse)
    assert "re-evaluated" in won.reason
    assert alias_version("resplit-vae", "champion") == "2"
    assert alias_version("resplit-vae", "challenger") is None  # the winner drops its challenger alias

    # The old champion (other snapshot) comes back as candidate; no re-evaluation: champion kept.
    back = registry.promote(champ.name, champ.version, reevaluate=lambda mv: None)
    assert (back.alias, back.previous_champion) == ("challenger", "2")
    assert (alias_version("resplit-vae", "champion"), alias_version("resplit-vae", "challenger")) == ("2", "1")


def test_a_champion_measured_with_other_evaluation_settings_is_only_replaced_when_reevaluated(work, models):
    # The champion's NLL as the `cpu` preset measures it (the whole test split, k=5000); the
    # candidate's as `quick` does (the first 1,000 images, k=250): the two figures do not compare.
    champ = register(work, models["mid"], "effort", preset="cpu")
    assert registry.promote(champ.name, champ.version).alias == "champion"
    candidate = register(work, models["best"], "effort")
    kept = registry.promote(candidate.name, candidate.version)
    assert (kept.alias, kept.champion_value) == ("challenger", None)
    assert "other evaluation settings" in kept.reason and "champion kept" in kept.reason
    asked = []

    def reevaluate_as_quick(mv) -> float:
        asked.append(str(mv.version))
        return models["mid"].gate_value

    won = registry.promote(candidate.name, candidate.version, reevaluate=reevaluate_as_quick)
    assert asked == [champ.version]
    assert (won.alias, won.champion_value) == ("champion", models["mid"].gate_value) and "re-evaluated" in won.reason


def test_reevaluated_champion_that_scores_better_stays(work, models):
    champ = register(work, models["best"], "resplit-better")
    registry.promote(champ.name, champ.version)
    candidate = register(work, models["other_snapshot"], "resplit-better")
    better = models["other_snapshot"].gate_value - 5.0
    lost = registry.promote(candidate.name, candidate.version, reevaluate=lambda mv: better)
    assert (lost.alias, lost.champion_value) == ("challenger", better)
    assert "does not beat" in lost.reason and "re-evaluated" in lost.reason
    assert alias_version("resplit-better-vae", "champion") == "1"


def test_a_champion_whose_reevaluation_is_nan_gives_way_to_a_finite_candidate(work, models):
    champ = register(work, models["best"], "resplit-nan")
    registry.promote(champ.name, champ.version)
    candidate = register(work, models["other_snapshot"], "resplit-nan")
    won = registry.promote(candidate.name, candidate.version, reevaluate=lambda mv: float("nan"))
    assert (won.alias, won.previous_champion, won.champion_value) == ("champion", "1", None)
    assert "is NaN" in won.reason and f"{models['other_snapshot'].gate_value:.4f} replaces it" in won.reason
    assert alias_version("resplit-nan-vae", "champion") == candidate.version
    json.dumps(won.to_dict(), allow_nan=False)  # the run record stays strict JSON


@pytest.mark.parametrize("family", ["vae", "gan"])
def test_a_champion_whose_figures_are_not_finite_reevaluates_as_nan(work, family):
    # What tasks.promote hands the gate above: a NaN, not an evaluation error that would fail the
    # promotion of every candidate (a NaN likelihood for the VAE, NaN samples for the GAN's FID).
    from genmodels.evaluation.classifier import load_or_train_classifier
    from genmodels.models import weights_digest
    from genmodels.models import build_model, checkpoint_bytes

    store, snapshot = work["store"], work["snapshots"][0]
    model = build_model(family, snapshot.image, **(TINY if family == "vae" else
                                                   {"latent_dim": 4, "g_width": 4, "d_width": 4, "d_features": 8,
                                                    "embed_dim": 4}))
    with torch.no_grad():
        for p in (model.parameters() if family == "vae" else model.generator_ema.parameters()):
            p.fill_(float("nan"))
    network = weights_digest(load_or_train_classifier(snapshot, store).network)
    tags = {"genmodels.dataset": "digits", "genmodels.snapshot_hash": snapshot.hash,
            "genmodels.gate_metric": registry.gate_metric(family)}
    value, why_not = runs.reevaluate_champion(store, snapshot, checkpoint_bytes(model, {}), tags, "quick",
                                              feature_network=network)
    assert math.isnan(value) and why_not == ""


def test_a_promotion_whose_lease_was_taken_over_meanwhile_moves_no_alias(work, models):
    from genmodels.lease import LeaseLost

    champ = register(work, models["best"], "overtaken")
    registry.promote(champ.name, champ.version)
    candidate = register(work, models["other_snapshot"], "overtaken")
    store, leases = work["store"], f"leases/promote/{champ.name}/"

    def slow_reevaluation(mv) -> float:
        # It outlasted the lease (renewals failing): another promotion took the next generation.
        newest = max(int(k.rsplit("/", 1)[1][:-5]) for k in store.list(leases))
        assert store.create_exclusive(f"{leases}{newest + 1:012d}.json", b'{"owner": "another promotion"}')
        return models["other_snapshot"].gate_value + 5.0  # the candidate would win

    with pytest.raises(LeaseLost):
        registry.promote(candidate.name, candidate.version, reevaluate=slow_reevaluation, lease_storage=store)
    assert alias_version(champ.name, "champion") == champ.version
    assert alias_version(champ.name, "challenger") is None


# --- registration refusals --------------------------------------------------------------------------
def test_a_dataset_whose_experiment_was_deleted_is_refused_naming_the_way_out(work):
    # MLflow's delete keeps the name: every registration of the dataset failed, after its training.
    from mlflow import MlflowClient

    client = MlflowClient()
    eid = client.create_experiment("deleted-ds")
    client.delete_experiment(eid)
    for refused in (lambda: registry.check_experiment("deleted-ds"),
                    lambda: registry.experiment_id("deleted-ds", work["artifact_root"])):
        with pytest.raises(ValueError, match=rf"experiment 'deleted-ds' \(id {eid}\) is deleted.*"
                                             rf"mlflow experiments restore --experiment-id {eid}"):
            refused()
    client.restore_experiment(eid)
    registry.check_experiment("deleted-ds")
    assert registry.experiment_id("deleted-ds", work["artifact_root"]) == eid
    registry.check_experiment("never-created")  # created at its first registration


def test_gate_metric_is_fid_for_the_gan_and_nll_otherwise():
    assert registry.gate_metric("gan") == "fid"
    for family in ("mixture", "vae", "cvae", "pixelrnn"):
        assert registry.gate_metric(family) == "nll_nats"


@pytest.mark.parametrize("bad", ["missing", math.nan, math.inf], ids=["missing", "nan", "inf"])
def test_register_without_finite_gate_metric_creates_nothing(work, models, bad):
    from mlflow import MlflowClient

    metrics = {k: v for k, v in models["mid"].metrics.items() if k != "nll_nats"}
    if bad != "missing":
        metrics["nll_nats"] = bad
    dataset = f"nogate-{bad}"
    with pytest.raises(ValueError, match=r"finite gate metric 'nll_nats'"):
        register(work, models["mid"], dataset, metrics=metrics)
    client = MlflowClient()
    assert client.search_registered_models(filter_string=f"name='{dataset}-vae'") == []
    assert client.get_experiment_by_name(dataset) is None  # no run logged anywhere


def test_register_refuses_graphs_of_another_family(work, models):
    from mlflow import MlflowClient

    metrics = {**models["mid"].metrics, "fid": 1.0}
    with pytest.raises(ValueError, match="family 'vae'"):
        register(work, models["mid"], "wrongfamily", metrics=metrics, family="gan")
    assert MlflowClient().get_experiment_by_name("wrongfamily") is None


# --- the registered model itself (conditional case) --------------------------------------------------
def test_registered_cvae_loads_as_onnx_and_as_a_pyfunc_over_the_api_table(work, models):
    import mlflow
    import pandas as pd

    from genmodels.models import load_checkpoint, model_from_checkpoint

    reg = register(work, models["cvae"], "cond")
    uri = f"models:/{reg.name}/{reg.version}"
    graph = mlflow.onnx.load_model(uri)
    assert graph.graph.node and {i.name for i in graph.graph.input} >= {"labels"}

    model = model_from_checkpoint(load_checkpoint(models["cvae"].run.get_bytes("model.pt")))
    pyfunc = mlflow.pyfunc.load_model(uri)
    inputs = pyfunc.metadata.get_input_schema()
    # labels (the API's name) is in the schema only to reach predict() and be refused there.
    assert inputs.input_names() == ["seed", "n", "label", "temperature", "labels"]
    assert inputs.required_input_names() == ["seed", "n"]
    with pytest.raises(mlflow.exceptions.MlflowException, match="the class column is 'label'"):
        pyfunc.predict(pd.DataFrame({"seed": [3], "n": [2], "labels": [4]}))
    assert pyfunc.metadata.get_output_schema().input_names() == ["images"]

    # One request per row; each samples what torch samples for that seed, label and temperature.
    table = pd.DataFrame({"seed": [3, 3, 8], "n": [5, 2, 1], "label": [0, 9, 4], "temperature": [0.8, 0.8, 1.0]})
    out = pyfunc.predict(table)
    assert list(out.columns) == ["images"] and len(out) == len(table)
    for images, row in zip(out["images"], table.itertuples()):
        with torch.no_grad():
            want = model.sample(row.n, labels=row.label, seed=row.seed, temperature=row.temperature).numpy()
        assert images.shape == want.shape == (row.n, 1, 8, 8)
        assert np.abs(images - want).max() <= 1e-4


def test_load_sampler_and_the_bulk_path_share_one_fetch_of_the_graphs(work, gate):
    from genmodels.sampling import OnnxSampler

    name = gate["best"]["registered"].name
    mv, files = registry.fetch_graphs(name, "champion")
    assert str(mv.version) == registry.current_version(name) and files and all(k.endswith(".onnx") for k in files)
    loaded = registry.load_sampler(name)
    assert loaded.version == str(mv.version)
    np.testing.assert_array_equal(loaded.sampler.sample(3, seed=4), OnnxSampler.from_bytes(files).sample(3, seed=4))
    with pytest.raises(LookupError, match="has the alias 'nobody'"):
        registry.fetch_graphs(name, "nobody")


def test_configure_is_idempotent_with_its_own_default(work, monkeypatch):
    import mlflow

    calls = []
    set_uri = mlflow.set_tracking_uri
    monkeypatch.setattr(mlflow, "set_tracking_uri", lambda uri: (calls.append(uri), set_uri(uri)))
    # No argument: MLFLOW_TRACKING_URI (set for this module), which the fixture configured already.
    assert registry.configure() == registry.configure() == f"sqlite:///{work['root']}/mlflow.db"
    assert calls == []


# --- concurrent promotions ------------------------------------------------------------------------
@pytest.mark.parametrize("first", ["mid", "best"])
def test_two_concurrent_promotions_end_with_the_better_one_champion(work, models, monkeypatch, first):
    """Both retrains read the champion (worst) before either moves the alias, and the worse one
    moves it last: a read-compare-write would leave it champion."""
    import threading

    base = register(work, models["worst"], f"race-{first}")
    registry.promote(base.name, base.version)
    regs = {key: register(work, models[key], f"race-{first}") for key in ("mid", "best")}
    both_read = threading.Barrier(2, timeout=2.0)  # broken (not waited out twice) once the lease serializes them
    real_champion = registry.champion
    reads: dict[str, int] = {}

    def champion(name):
        current = real_champion(name)
        me = threading.current_thread().name
        reads[me] = reads.get(me, 0) + 1
        if reads[me] == 1:
            try:
                both_read.wait()
            except threading.BrokenBarrierError:
                pass
            if me != first:
                time.sleep(0.5)
        return current

    monkeypatch.setattr(registry, "champion", champion)
    out = {}
    threads = [threading.Thread(target=lambda k=key: out.__setitem__(k, registry.promote(
        regs[k].name, regs[k].version, lease_storage=work["store"])), name=key) for key in ("mid", "best")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert alias_version(base.name, "champion") == regs["best"].version, out
    # Whichever decided first, best decided against what was then champion (worst, or mid): it won.
    assert out["best"].alias == "champion" and out["best"].previous_champion in (base.version, regs["mid"].version)
    if out["mid"].alias == "champion":  # mid went first and beat worst; best then beat mid
        assert out["best"].previous_champion == regs["mid"].version

"""A run's plan: its initial weights follow its seed, and a checkpoint resumes only the plan it was
started with (model config, training config, snapshot), the invocation's budget aside."""

import re

import numpy as np
import pytest
import torch

from genmodels import runs
from genmodels.data import PrepConfig
from genmodels.storage import open_storage

TINY_VAE = {"latent_dim": 2, "architecture": "mlp", "hidden": (8,)}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return open_storage(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def snapshot(store):
    return runs.snapshot_for(store, "digits", None, PrepConfig(seed=0))


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", ["vae", "gan", "pixelrnn"])
def test_initial_weights_are_a_function_of_the_seed_alone(snapshot, family):
    first, train_cfg, _ = runs.plan_run(snapshot, family, "quick", overrides={"seed": 3})
    torch.rand(100)  # whatever the global RNG did in between
    rng_before = torch.get_rng_state()
    again, _, _ = runs.plan_run(snapshot, family, "quick", overrides={"seed": 3})
    other, _, _ = runs.plan_run(snapshot, family, "quick", overrides={"seed": 4})
    assert torch.equal(torch.get_rng_state(), rng_before)  # drawn without touching the global RNG
    assert train_cfg.seed == 3
    a, b, c = weights(first), weights(again), weights(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_a_checkpoint_resumes_only_its_own_training_config(store, snapshot):
    root = store.child("resume-check")
    plan = {"epochs": 1, "max_train_examples": 64, "max_val_examples": 32, "batch_size": 32}
    runs.train_family(root, snapshot, "vae", "quick", overrides=plan, model_overrides=TINY_VAE)
    with pytest.raises(ValueError, match=r"another training config \(epochs 1 -> 2\); pass --fresh"):
        runs.train_family(root, snapshot, "vae", "quick", overrides={**plan, "epochs": 2}, model_overrides=TINY_VAE)
    with pytest.raises(ValueError, match=r"lr 0.001 -> 0.002, seed 0 -> 1"):
        runs.train_family(root, snapshot, "vae", "quick", overrides={**plan, "lr": 2e-3, "seed": 1},
                          model_overrides=TINY_VAE)
    # A wall-clock budget, the device and the checkpoint cadence shape no trajectory.
    again = runs.train_family(root, snapshot, "vae", "quick", model_overrides=TINY_VAE,
                              overrides={**plan, "max_seconds": 600.0, "device": "cpu", "checkpoint_every": 2})
    assert again.result.resumed_from_epoch == 1 and again.result.epochs_completed == 1
    # ... nor the model: its bytes (the registry's digest) stay, so it is not registered twice.
    model_pt = again.run.get_bytes("model.pt")
    runs.train_family(root, snapshot, "vae", "quick", model_overrides=TINY_VAE,
                      overrides={**plan, "max_seconds": 60.0, "workers": 1})
    assert again.run.get_bytes("model.pt") == model_pt
    fresh = runs.train_family(root, snapshot, "vae", "quick", overrides={**plan, "epochs": 2},
                              model_overrides=TINY_VAE, fresh=True)
    assert fresh.result.resumed_from_epoch == 0 and fresh.result.epochs_completed == 2


def test_a_checkpoint_of_another_model_config_is_refused_with_what_differs(store, snapshot):
    """As for the training config, the refusal says which setting changed, not just that one did."""
    root = store.child("resume-model-check")
    plan = {"epochs": 1, "max_train_examples": 64, "max_val_examples": 32, "batch_size": 32}
    runs.train_family(root, snapshot, "vae", "quick", overrides=plan, model_overrides=TINY_VAE)
    with pytest.raises(ValueError, match=r"another model config \(latent_dim 2 -> 3\); pass --fresh"):
        runs.train_family(root, snapshot, "vae", "quick", overrides=plan, model_overrides={**TINY_VAE, "latent_dim": 3})


def test_new_weights_take_the_old_weights_figures_pictures_and_graphs_with_them(store, snapshot):
    root = store.child("derived-check")
    plan = {"epochs": 1, "max_train_examples": 64, "max_val_examples": 32, "batch_size": 32}
    outcome = runs.train_family(root, snapshot, "vae", "quick", overrides=plan, model_overrides=TINY_VAE)
    run = outcome.run
    runs.export_run(run)
    derived = {"metrics.json": b'{"nll_nats": 1.0}', runs.EVALUATION_RECORD: b'{"seed": 0}', "samples.png": b"png"}
    for key, data in derived.items():
        run.put_bytes(key, data)
    graphs = run.list(f"{runs.ONNX_PREFIX}/")
    assert graphs and set(runs.derived_keys(run)) == {*derived, *graphs}

    # The same plan again, even from scratch, gives the same weights: what they gave stays.
    runs.train_family(root, snapshot, "vae", "quick", overrides=plan, model_overrides=TINY_VAE, fresh=True)
    assert all(run.exists(key) for key in [*derived, *graphs])

    # Other weights: nothing measured on the old ones is left to be reported or registered.
    old_model = run.get_bytes("model.pt")
    runs.train_family(root, snapshot, "vae", "quick", overrides={**plan, "seed": 1}, model_overrides=TINY_VAE,
                      fresh=True)
    assert run.get_bytes("model.pt") != old_model
    assert runs.derived_keys(run) == [] and not run.exists("metrics.json")
    assert runs.evaluation_record(run) == {} and run.exists("history.json")


def test_a_report_beside_a_retrain_leaves_out_the_family_whose_figures_just_went(store, snapshot, monkeypatch):
    root = store.child("report-race")
    plan = {"epochs": 1, "max_train_examples": 64, "max_val_examples": 32, "batch_size": 32}
    run = runs.train_family(root, snapshot, "vae", "quick", overrides=plan, model_overrides=TINY_VAE).run
    run.put_bytes("metrics.json", b'{"nll_nats": 40.0}')
    assert runs.collect_metrics(root, snapshot.dataset, "quick", snapshot.hash)["vae"]["nll_nats"] == 40.0

    # Another process's finish_run removes the old figures right after this report read model.pt.
    read = type(run).get_bytes

    def racing_get_bytes(self, key):
        data = read(self, key)
        if key == "model.pt":
            run.delete("metrics.json")
        return data

    monkeypatch.setattr(type(run), "get_bytes", racing_get_bytes)
    report = runs.write_report(root, snapshot, "quick")
    assert "| vae |" not in report.markdown and report.picture is not None  # still drawn, named alone


def test_a_report_with_no_family_evaluated_says_so_instead_of_a_bare_table_header(store, snapshot):
    root = store.child("report-empty")
    plan = {"epochs": 3, "max_train_examples": 64, "max_val_examples": 32, "batch_size": 32, "max_seconds": 0.0}
    outcome = runs.train_family(root, snapshot, "vae", "quick", overrides=plan, model_overrides=TINY_VAE)
    assert not outcome.finished  # stopped by its budget: no figures, as `genmodels run --max-minutes` leaves it
    report = runs.write_report(root, snapshot, "quick")
    assert "| family |" not in report.markdown
    assert "No family of preset quick has been evaluated on this snapshot yet" in report.markdown
    assert root.get_bytes(report.markdown_key).decode() == report.markdown


def test_a_ray_run_is_named_by_its_plan_not_by_the_invocations_budget():
    from genmodels.distributed import ray_run_name
    from genmodels.training import TrainConfig

    base = TrainConfig(epochs=3, seed=0)

    def name(workers=1, **changes):
        train = TrainConfig.from_dict({**base.to_dict(), **changes}).to_dict()
        return ray_run_name("vae", "quick", TINY_VAE, train, "ab" * 32, workers)

    assert name() == name(max_seconds=60.0, device="cpu", checkpoint_every=2)  # resumes the same run
    assert len({name(), name(epochs=4), name(seed=1), name(lr=2e-3), name(workers=2)}) == 5
    # The preset's worker count is a default, not the plan: the world size the run got is.
    hinted = TrainConfig.from_dict({**base.to_dict(), "workers": 2}).to_dict()
    assert ray_run_name("vae", "quick", TINY_VAE, hinted, "ab" * 32, 1) == name()


def test_a_run_gets_the_workers_its_preset_wants_that_the_cluster_holds():
    from genmodels.distributed import fitting_workers

    assert fitting_workers(2, {"CPU": 2.0}, 32) == 2  # `make run`'s own Ray on 2 cores
    assert fitting_workers(2, {"CPU": 1.0}, 32) == 1  # a group that cannot be placed would wait forever
    assert fitting_workers(4, {"CPU": 3.0}, 32) == 2  # 3 does not divide the global batch of 32
    assert fitting_workers(8, {"CPU": 16.0}, 32) == 8
    assert fitting_workers(2, {"CPU": 16.0, "GPU": 1.0}, 32) == 1  # one per GPU where there are GPUs
    assert fitting_workers(1, {"CPU": 16.0}, 128) == 1
    assert fitting_workers(2, {"CPU": 16.0, "GPU": 1.0}, 32, use_gpu=False) == 2  # told to train on CPUs


def test_a_champion_that_trained_on_the_candidates_test_images_is_not_scored_on_them():
    """Digits have no test split of their own: another seed draws another one, mostly out of the
    first snapshot's training images; Fashion-MNIST's test file is the same whatever the seed."""
    from genmodels.data import prepare

    first, reseeded = (prepare("digits", None, PrepConfig(seed=s)) for s in (0, 1))
    assert runs.saw_test_images(first, reseeded) and runs.saw_test_images(reseeded, first)
    assert not runs.saw_test_images(first, first)
    again = prepare("digits", None, PrepConfig(seed=0, val_size=0.2))  # another validation share, same test split
    assert not runs.saw_test_images(first, again) and not runs.saw_test_images(again, first)


def test_test_images_only_the_champion_saw_are_not_offset_by_repeats_the_candidate_saw():
    from types import SimpleNamespace

    from genmodels.data.prep import Split

    def snapshot(train, test):
        def split(ids):
            x = np.array(ids, dtype=np.uint8).reshape(-1, 1, 1, 1)
            return Split(x, np.zeros(len(ids), dtype=np.int64))
        return SimpleNamespace(splits={"train": split(train), "val": split([]), "test": split(test)})

    # The candidate's source repeats test images 1 and 2 in its training images; the champion
    # trained on test image 3, which the candidate never saw.
    candidate = snapshot(train=[1, 2, 9], test=[1, 2, 3, 4])
    champion = snapshot(train=[3, 8], test=[5])
    assert runs.saw_test_images(champion, candidate)
    assert not runs.saw_test_images(snapshot(train=[1, 2, 8], test=[5]), candidate)  # repeats both saw


@pytest.mark.parametrize("damage", [b"not a checkpoint", None], ids=["garbage", "truncated"])
def test_a_damaged_checkpoint_is_named_by_its_url_wherever_a_run_reads_it(store, snapshot, damage):
    from genmodels.models import checkpoint_bytes
    from genmodels.training import TrainResult

    model, train_cfg, meta = runs.plan_run(snapshot, "vae", "quick", model_overrides=TINY_VAE)
    whole = checkpoint_bytes(model, meta)
    bad = damage if damage is not None else whole[: len(whole) // 2]
    root = store.child(f"damaged-{len(bad)}")
    run = root.child(runs.run_prefix(snapshot.dataset, "vae", "quick"))

    run.put_bytes("model.pt", bad)
    where = re.escape(run.url_for("model.pt"))
    with pytest.raises(ValueError, match=f"^{where}: not a loadable genmodels checkpoint"):
        runs.load_model(run)
    with pytest.raises(ValueError, match=f"^{where}: not a loadable genmodels checkpoint"):
        runs.collect_metrics(root, snapshot.dataset, "quick", snapshot.hash)
    result = TrainResult(model=model, history=[], epochs_completed=0, best_val_loss=None, stopped_early=False,
                         resumed_from_epoch=0)
    with pytest.raises(ValueError, match=f"^{where}: not a loadable genmodels checkpoint"):
        runs.finish_run(run, result, train_cfg, meta)
    assert run.get_bytes("model.pt") == bad  # nothing written over it

    # The resume path says how to get past it; a model's checkpoint there cannot be resumed either.
    where = re.escape(run.url_for("checkpoint.pt"))
    for saved, defect in ((bad, "not a loadable genmodels checkpoint"), (whole, "no training state")):
        run.put_bytes("checkpoint.pt", saved)
        with pytest.raises(ValueError, match=f"(?s)^{where}: .*{defect}.*; pass --fresh to start over$"):
            runs.train_family(root, snapshot, "vae", "quick", model_overrides=TINY_VAE)
        assert run.get_bytes("checkpoint.pt") == saved


UNFITTING_STATE = "its vae training state does not fit .*"


def _edit_first_tensor_out(state):
    name = next(iter(state["state_dict"]))
    del state["state_dict"][name]
    return UNFITTING_STATE + re.escape(f'Missing key(s) in state_dict: "{name}"')


def _edit_tensor_in(state):
    state["state_dict"]["decoder.added.weight"] = torch.zeros(1)
    return UNFITTING_STATE + re.escape('Unexpected key(s) in state_dict: "decoder.added.weight"')


# Checkpoints another version of genmodels wrote: each edit returns the defect its error must name.
UNFITTING = {
    "model-config-field": lambda state: state["config"].update(old_field=1)
    or r"its vae model config does not fit .*VAEConfig: unknown keys \['old_field'\]",
    "train-config-field": lambda state: state["train_state"]["train_config"].update(ema=0.9)
    or r"its training config does not fit .*TrainConfig: unknown keys \['ema'\]",
    "tensor-missing": _edit_first_tensor_out,
    "tensor-added": _edit_tensor_in,
    # A KeyError, which friendly_errors leaves a traceback (a bug's), unless named as the checkpoint's.
    "optimizer-missing": lambda state: state["train_state"]["optimizers"].clear()
    or UNFITTING_STATE + r"lacks 'model'",
}


@pytest.mark.parametrize("edit", UNFITTING.values(), ids=UNFITTING.keys())
def test_a_checkpoint_another_version_wrote_is_named_with_what_does_not_fit(store, snapshot, edit):
    """It loads, but every retry would fail on it alike: the error names it and the way past it."""
    import io

    root = store.child("unfitting")
    plan = {"epochs": 1, "max_train_examples": 64, "max_val_examples": 32, "batch_size": 32}
    run = root.child(runs.run_prefix(snapshot.dataset, "vae", "quick"))
    if not run.exists("checkpoint.pt"):
        runs.train_family(root, snapshot, "vae", "quick", overrides=plan, model_overrides=TINY_VAE)
    state = torch.load(io.BytesIO(run.get_bytes("checkpoint.pt")), weights_only=True)
    defect = edit(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    edited = buffer.getvalue()
    original = run.get_bytes("checkpoint.pt")
    run.put_bytes("checkpoint.pt", edited)
    try:
        where = re.escape(run.url_for("checkpoint.pt"))
        with pytest.raises(ValueError, match=f"^{where}: {defect}.*; pass --fresh to start over$") as raised:
            runs.train_family(root, snapshot, "vae", "quick", overrides=plan, model_overrides=TINY_VAE)
        assert "\n" not in str(raised.value)  # the CLI's error is one line (torch's lists one a line)
        assert run.get_bytes("checkpoint.pt") == edited  # left for the user to look at, or --fresh
    finally:
        run.put_bytes("checkpoint.pt", original)

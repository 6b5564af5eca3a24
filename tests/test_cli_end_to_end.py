"""The `genmodels` command end to end on sklearn digits: every family trains, evaluates,
samples reproducibly, and bad input fails with a clear message and exit code 2."""

import io
import json
import re

import pytest
from PIL import Image
from typer.testing import CliRunner

from genmodels.cli import app
from genmodels.models import FAMILIES, load_checkpoint

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained_store(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    # The quick preset's epochs are sized for Fashion-MNIST's 48k training images; on 1.3k
    # digits they are a few dozen steps, too few for the CVAE's samples to follow their label.
    result = invoke("run", "--dataset", "digits", "--families", "all", "--preset", "quick", "--epochs", 20,
                    "--out", store)
    assert result.exit_code == 0, result.output
    return store


def test_run_writes_models_metrics_pictures_and_report(trained_store):
    report = (trained_store / "reports" / "digits-quick.md").read_text()
    assert "train_seconds" in report and report.count("\n| ") == len(FAMILIES) + 1  # header + one row each
    for family in FAMILIES:
        run = trained_store / "runs" / "digits" / f"{family}-quick"
        assert family in report
        ckpt = load_checkpoint(run / "model.pt")
        assert ckpt["family"] == family and ckpt["meta"]["dataset"] == "digits"
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["fid"] >= 0 and metrics["fid_real_floor"] >= 0
        if family == "gan":
            assert "nll_nats" not in metrics  # no likelihood, and no made-up number
        else:
            assert 0 < metrics["nll_nats"] < 64 * 0.6932  # better than a coin flip per pixel
        with Image.open(run / "samples.png") as img:
            assert img.size[0] > 0
    assert json.loads((trained_store / "runs/digits/cvae-quick/metrics.json").read_text())["class_accuracy"] > 0.3
    assert (trained_store / "runs/digits/cvae-quick/analogies.png").exists()
    manifest = next((trained_store / "snapshots" / "digits").glob("*/manifest.json"))
    assert json.loads(manifest.read_text())["quantization"] == "binary"


def test_sample_same_seed_same_png(trained_store, tmp_path):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    common = ["sample", "--family", "cvae", "--dataset", "digits", "--out", trained_store, "--n", 16, "--label", 3]
    assert invoke(*common, "--seed", 5, "--png", a).exit_code == 0
    assert invoke(*common, "--seed", 5, "--png", b).exit_code == 0
    assert invoke(*common, "--seed", 6, "--png", c).exit_code == 0
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


def test_sample_png_is_laid_out_as_the_apis_grid(trained_store, tmp_path):
    import numpy as np

    from genmodels.images import grid_png

    out = tmp_path / "ten.png"
    common = ["sample", "--family", "vae", "--dataset", "digits", "--out", trained_store]
    assert invoke(*common, "--n", 10, "--seed", 1, "--png", out).exit_code == 0
    with Image.open(out) as cli, Image.open(io.BytesIO(grid_png(np.zeros((10, 1, 8, 8))))) as api_layout:
        assert cli.size == api_layout.size and cli.size[0] > cli.size[1]  # 4 per row, 3 rows, as grid.png


def test_a_refused_label_names_the_option(trained_store, tmp_path):
    import numpy as np

    beyond = invoke("sample", "--family", "cvae", "--dataset", "digits", "--out", trained_store, "--label", 10,
                    "--png", tmp_path / "s.png")
    assert beyond.exit_code == 2 and "--label must lie in [0, 10), got 10" in beyond.output, beyond.output
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    unconditional = invoke("complete", "--family", "pixelrnn", "--dataset", "digits", "--out", trained_store,
                           "--image", image, "--known-rows", 4, "--label", 1, "--png", tmp_path / "c.png")
    assert unconditional.exit_code == 2 and "it takes no --label" in unconditional.output, unconditional.output
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "c.png").exists()


@pytest.mark.parametrize("family", ["pixelrnn", "mixture"])
def test_complete_from_a_run_keeps_the_known_rows(trained_store, tmp_path, family):
    import numpy as np

    image = tmp_path / "in.png"
    Image.fromarray(np.where(np.arange(64).reshape(8, 8) % 3 == 0, 255, 0).astype(np.uint8)).save(image)
    out = tmp_path / "out.png"
    result = invoke("complete", "--family", family, "--dataset", "digits", "--out", trained_store,
                    "--image", image, "--known-rows", 4, "--n", 4, "--png", out)
    assert result.exit_code == 0, result.output
    with Image.open(out) as grid:
        assert grid.size[0] > 8 and grid.size[1] > 8


def test_train_again_resumes_finished_run_without_retraining(trained_store):
    run = trained_store / "runs" / "digits" / "vae-quick"
    before = load_checkpoint(run / "checkpoint.pt")["train_state"]["epoch"]
    # The same plan as the fixture's run (its --epochs too): a different one is refused, below.
    result = invoke("train", "--family", "vae", "--dataset", "digits", "--epochs", 20, "--out", trained_store)
    assert result.exit_code == 0, result.output
    assert f"resumed at epoch {before}" in result.output
    after = load_checkpoint(run / "checkpoint.pt")["train_state"]
    assert after["epoch"] == before and len(after["history"]) == before  # no epoch counted twice


def test_checkpoint_written_before_a_new_config_field_still_resumes(trained_store, tmp_path):
    """A field added with its default since the checkpoint was written (here: the VAE's
    label_film, which the unconditional VAE leaves False) is the same config."""
    import shutil

    import torch

    store = tmp_path / "store"
    shutil.copytree(trained_store / "snapshots", store / "snapshots")
    shutil.copytree(trained_store / "runs" / "digits" / "vae-quick", store / "runs" / "digits" / "vae-quick")
    ckpt_path = store / "runs" / "digits" / "vae-quick" / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt["config"].pop("label_film") is False
    torch.save(ckpt, ckpt_path)
    result = invoke("train", "--family", "vae", "--dataset", "digits", "--epochs", 20, "--out", store)
    assert result.exit_code == 0, result.output
    assert "resumed at epoch" in result.output


def test_resume_with_other_config_is_refused(trained_store):
    result = invoke("train", "--family", "vae", "--dataset", "digits", "--out", trained_store, "--quantization", "8bit")
    assert result.exit_code == 2
    assert "another" in result.output and "--fresh" in result.output
    # Another epoch count is another plan (a cosine schedule's length), not a resume.
    result = invoke("train", "--family", "vae", "--dataset", "digits", "--out", trained_store)
    assert result.exit_code == 2
    said = " ".join(result.output.split())  # the console wraps long lines
    assert "another training config (epochs 20 -> 4)" in said and "--fresh" in said


def test_a_run_on_a_time_budget_is_evaluated_once_it_has_finished(tmp_path):
    store = tmp_path / "store"
    # A zero-minute budget stops training after every epoch: three invocations for three epochs.
    command = ("run", "--dataset", "digits", "--families", "mixture", "--preset", "quick", "--epochs", 3,
               "--max-minutes", 0, "--out", store)
    run = store / "runs" / "digits" / "mixture-quick"
    for epoch in (1, 2):
        result = invoke(*command)
        assert result.exit_code == 0, result.output
        said = " ".join(result.output.split())
        assert f"stopped training after epoch {epoch} of 3; not evaluated" in said
        assert not (run / "metrics.json").exists()
    result = invoke(*command)
    assert result.exit_code == 0, result.output
    assert "not evaluated" not in result.output
    assert len(json.loads((run / "history.json").read_text())) == 3
    assert "nll_nats" in json.loads((run / "metrics.json").read_text())


def test_a_fresh_run_on_a_time_budget_says_to_go_on_without_fresh(tmp_path, monkeypatch):
    import torch

    from genmodels import runs

    # --fresh starts over on every invocation: repeating the command would never get further.
    monkeypatch.setattr(runs, "resolve_device", lambda name: torch.device("cpu"))  # batches of 64 test images
    command = ("run", "--dataset", "digits", "--families", "mixture", "--preset", "quick", "--epochs", 2,
               "--out", tmp_path / "store")
    result = invoke(*command, "--fresh", "--max-minutes", 0)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "stopped training after epoch 1 of 2; not evaluated (run it again without --fresh to go on)" in said
    # As it says: without --fresh it trains epoch 2, and its paused evaluation goes on by the same command.
    result = invoke(*command, "--max-minutes", 0, "--max-eval-minutes", 0)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "stopped training" not in said
    assert len(json.loads((tmp_path / "store/runs/digits/mixture-quick/history.json").read_text())) == 2
    assert "paused its likelihood pass after 64 of" in said and "(the same command goes on)" in said
    result = invoke(*command, "--fresh", "--max-eval-minutes", 0)
    said = " ".join(result.output.split())
    assert "paused its likelihood pass" in said and "(run it again without --fresh to go on)" in said


def test_a_likelihood_pass_on_a_time_budget_goes_on_where_it_paused_to_the_unbudgeted_figures(tmp_path, monkeypatch):
    import torch

    from genmodels import runs

    # Evaluated on the CPU whatever the host has: the exact families' passes take batches of 1,000
    # on a GPU, all of digits' test images at once.
    monkeypatch.setattr(runs, "resolve_device", lambda name: torch.device("cpu"))
    store = tmp_path / "store"
    # A zero-minute evaluation budget pauses the finished model's likelihood pass after every batch of
    # test images (64 on the CPU): one invocation per batch, each writing its sums and no metrics.
    # `run` and `evaluate` take turns: each goes on from the other's last batch; `evaluate` says it
    # paused with exit code 3, as its output is otherwise the metrics.
    command = ("run", "--dataset", "digits", "--families", "mixture", "--preset", "quick", "--epochs", 3,
               "--max-eval-minutes", 0, "--out", store)
    evaluate = ("evaluate", "--dataset", "digits", "--family", "mixture", "--preset", "quick",
                "--max-eval-minutes", 0, "--out", store)
    run = store / "runs" / "digits" / "mixture-quick"
    scored = []
    while len(scored) < 10:
        turn = evaluate if scored and len(scored) % 2 else command
        result = invoke(*turn)
        said = " ".join(result.output.split())
        if result.exit_code == 0 and "not evaluated" not in said:
            break
        assert result.exit_code == (3 if turn is evaluate else 0), result.output
        paused = re.search(r"paused its likelihood pass after (\d+) of (\d+) test images", said)
        assert paused, said
        scored.append(int(paused[1]))
        assert not (run / "metrics.json").exists()
    assert scored and scored == [64 * (i + 1) for i in range(len(scored))], scored
    assert len(json.loads((run / "history.json").read_text())) == 3  # trained once, then only evaluated
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["likelihood_examples"] > scored[-1]

    whole = tmp_path / "whole"
    result = invoke(*command[:-4], "--out", whole)
    assert result.exit_code == 0, result.output
    unbudgeted = json.loads((whole / "runs" / "digits" / "mixture-quick" / "metrics.json").read_text())
    figures = sorted(k for k in unbudgeted if not k.endswith("_seconds"))
    assert "nll_nats" in figures and "fid" in figures
    assert {k: metrics[k] for k in figures} == {k: unbudgeted[k] for k in figures}


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--family", "flow"], "unknown family 'flow'"),
        (["train", "--dataset", "cifar"], "cifar"),
        (["data", "prepare", "--dataset", "npz", "--source", "/nonexistent/x.npz"], "/nonexistent/x.npz"),
        (["data", "prepare", "--dataset", "digits", "--quantization", "4bit"], "4bit"),
        (["sample", "--family", "gan", "--dataset", "digits"], "no trained model"),
    ],
)
def test_bad_input_gives_clear_error_and_exit_2(tmp_path, args, message):
    result = invoke(*args, "--out", tmp_path)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and message in result.output
    assert not list((tmp_path).glob("runs/**/model.pt"))


def test_unreachable_storage_fails_before_training(closed_port):
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed_port}", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}
    result = runner.invoke(app, ["train", "--family", "vae", "--dataset", "digits", "--out", "s3://nobucket/x"], env=env)
    assert result.exit_code == 2, result.output
    assert "s3://nobucket" in result.output
    assert "preparing" not in result.output  # refused before any data work or training


@pytest.mark.parametrize("command", [["train"], ["evaluate"], ["run", "--families", "mixture"]])
def test_a_family_whose_runs_another_process_is_writing_is_refused_untouched(tmp_path, command):
    """The retrain flow holds the family's lease while it trains, evaluates and exports: the CLI
    writing the same run directory meanwhile would leave one model's metrics beside another's weights."""
    from genmodels.runs import run_lease

    with run_lease(str(tmp_path), "digits", "mixture"):
        args = [*command, "--dataset", "digits", "--out", tmp_path]
        result = invoke(*args, *([] if command[0] == "run" else ["--family", "mixture"]))
    assert result.exit_code == 2, result.output
    assert "lease 'retrain/digits/mixture' is held by" in " ".join(result.output.split())
    assert not list(tmp_path.glob("runs/**/*"))

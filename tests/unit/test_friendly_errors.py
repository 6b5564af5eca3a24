"""friendly_errors (genmodels/cli_options.py): an expected failure is one red line and exit code 2,
a bug keeps its traceback."""

from __future__ import annotations

import pytest
import torch
import typer
from typer.testing import CliRunner

from genmodels.cli_options import friendly_errors


def _app(error: BaseException) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    @friendly_errors
    def generate() -> None:
        raise error

    return app


def test_an_unknown_model_or_alias_is_one_line_and_exit_2():
    # What registry.fetch_graphs raises for `genmodels generate --model <unknown>`.
    result = CliRunner().invoke(_app(LookupError("no version of model 'nope' has the alias 'champion'")), [])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == ["error: no version of model 'nope' has the alias 'champion'"]
    assert "Traceback" not in result.output


def test_a_model_with_non_finite_figures_is_one_line_and_exit_2():
    # What `genmodels evaluate` on a GAN whose samples are NaN ended in: a traceback.
    from genmodels.evaluation.metrics import generate

    class NaNSampler(torch.nn.Module):
        family = "gan"
        image = type("Image", (), {"shape": (1, 2, 2)})()

        def sample(self, n, labels=None, seed=0, start=0):
            return torch.full((n, 1, 2, 2), float("nan"))

    with pytest.raises(FloatingPointError) as raised:
        generate(NaNSampler(), 4, seed=0)
    result = CliRunner().invoke(_app(raised.value), [])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        "error: gan samples must be finite and lie in [0, 1]; got range 0..0 with NaN/inf"]


@pytest.mark.parametrize("bug", [KeyError("status"), IndexError("list index out of range")])
def test_a_key_or_index_error_stays_a_traceback(bug):
    result = CliRunner().invoke(_app(bug), [])
    assert result.exit_code == 1 and result.exception is bug


def test_a_name_or_alias_mlflow_refuses_is_a_lookup_error_in_its_words(tmp_path):
    # `genmodels serve --models a/b`, `generate --alias 'x y'`: MLflow's refusal of the user's
    # input ended as its traceback. The registry's one look-up turns it into what friendly_errors
    # answers with one line (and the jobs API with a 404); MLflow's other errors stay its own.
    from registry_fixtures import registry_env

    from genmodels import registry

    with registry_env(tmp_path):
        with pytest.raises(LookupError, match=r"^Invalid model name 'a/b'\. Names cannot contain '/' or ':'\.$"):
            registry.current_version("a/b")
        with pytest.raises(LookupError, match=r"^Invalid alias name: 'x y'\. Names may only contain"):
            registry.fetch_graphs("fashion-mnist-vae", "x y")
        assert registry.current_version("fashion-mnist-vae") is None  # a valid name not registered


def test_a_tracking_uri_that_answers_404_is_an_error_not_a_model_without_champion(monkeypatch, tmp_path):
    # A wrong MLFLOW_TRACKING_URI path, or a proxy's 404 page: "File not found" is no answer
    # about the model (read as one, `retrain --if-no-champion` retrained every family).
    import functools
    import http.server
    import threading

    import mlflow
    from mlflow.exceptions import MlflowException

    from genmodels import registry

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    # Every path of an empty folder answers 404 "File not found".
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    try:
        mlflow.set_tracking_uri(f"http://127.0.0.1:{server.server_address[1]}/not-mlflow")
        with pytest.raises(MlflowException) as raised:
            registry.version_by_alias("fashion-mnist-vae", "champion")
        assert raised.value.error_code == "ENDPOINT_NOT_FOUND"
    finally:
        mlflow.set_tracking_uri(None)
        server.shutdown()


def test_any_other_mlflow_error_stays_a_traceback():
    from mlflow.exceptions import MlflowException

    fault = MlflowException("unexpected error in the store", error_code="INTERNAL_ERROR")
    result = CliRunner().invoke(_app(fault), [])
    assert result.exit_code == 1 and result.exception is fault

"""A promotion whose lease release fails after the alias moved (a transient storage fault)
reports the promotion it made: a raise there made Prefect retry the task, and the retry read the
moved alias back as "already the champion" (recorded not promoted, the previous champion lost).
MLflow is a fake client here: only the aliases and the gate tags matter."""

from __future__ import annotations

import pytest

from genmodels import records, registry
from genmodels.lease import Lease

T = "genmodels."


class _Version:
    def __init__(self, version: str, gate: float) -> None:
        self.version, self.aliases = version, []
        self.tags = {T + "gate_value": repr(gate), T + "gate_metric": "nll_nats", T + "snapshot_hash": "h",
                     registry.EVALUATION_TAG: "{}"}


@pytest.fixture
def fake_mlflow(monkeypatch):
    import mlflow
    from mlflow.exceptions import MlflowException

    aliases = {"champion": "1"}
    versions = {"1": _Version("1", 50.0), "2": _Version("2", 40.0)}

    class Client:
        def get_model_version(self, name, version):
            return versions[str(version)]

        def get_model_version_by_alias(self, name, alias):
            if alias not in aliases:
                raise MlflowException("alias not found", error_code="RESOURCE_DOES_NOT_EXIST")
            return versions[aliases[alias]]

        def set_registered_model_alias(self, name, alias, version):
            aliases[alias] = str(version)

        def delete_registered_model_alias(self, name, alias):
            aliases.pop(alias, None)

        def set_model_version_tag(self, name, version, key, value):
            versions[str(version)].tags[key] = value

    monkeypatch.setattr(mlflow, "MlflowClient", Client)
    return aliases


def test_a_failed_lease_release_after_the_alias_moved_reports_the_promotion(tmp_path, monkeypatch, fake_mlflow):
    real_release = Lease.release

    def release(self):
        real_release(self)
        raise ConnectionError("connection reset while releasing the lease")

    monkeypatch.setattr(Lease, "release", release)
    promotion = registry.promote("digits-vae", "2", lease_storage=(tmp_path / "store").as_uri())
    assert fake_mlflow["champion"] == "2"
    assert (promotion.alias, promotion.previous_champion) == ("champion", "1")
    registered = {"name": "digits-vae", "version": "2", "created": True, "gate_metric": "nll_nats",
                  "gate_value": 40.0}
    outcome = records.family_outcome({"registered": registered, "promotion": promotion.to_dict()})
    assert (outcome["promoted"], outcome["previous_champion"]) == (True, "1")


def test_a_promotion_run_again_after_the_alias_moved_names_the_champion_it_replaced(tmp_path, fake_mlflow):
    # The first run moved the alias and was killed before it returned; Prefect's retry decides again.
    first = registry.promote("digits-vae", "2", lease_storage=(tmp_path / "store").as_uri())
    again = registry.promote("digits-vae", "2", lease_storage=(tmp_path / "store").as_uri())
    assert (first.alias, first.previous_champion) == ("champion", "1")
    assert (again.alias, again.reason, again.previous_champion) == ("champion", "already the champion", "1")
    assert fake_mlflow["champion"] == "2"

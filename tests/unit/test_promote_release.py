"""Promotion decisions against a fake MLflow client (only the aliases and the gate tags matter):
a promotion whose lease release fails after the alias moved (a transient storage fault) reports
the promotion it made (a raise there made Prefect retry the task, and the retry read the moved
alias back as "already the champion": recorded not promoted, the previous champion lost); a FID
is compared as it stands only with one measured in the same domain classifier's features."""

from __future__ import annotations

import pytest

from genmodels import records, registry
from genmodels.lease import Lease

T = "genmodels."


class _Version:
    def __init__(self, version: str, gate: float, metric: str = "nll_nats", **tags: str) -> None:
        self.version, self.aliases = version, []
        self.tags = {T + "gate_value": repr(gate), T + "gate_metric": metric, T + "snapshot_hash": "h",
                     registry.EVALUATION_TAG: "{}", **tags}


@pytest.fixture
def versions() -> dict[str, _Version]:
    """The registered versions of the one model the fake serves: v1 champion (50), v2 (40)."""
    return {"1": _Version("1", 50.0), "2": _Version("2", 40.0)}


@pytest.fixture
def fake_mlflow(monkeypatch, versions):
    import mlflow
    from mlflow.exceptions import MlflowException

    aliases = {"champion": "1"}

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


NETWORK = registry.FEATURE_NETWORK_TAG


@pytest.mark.parametrize(("champion_network", "candidate_network", "alike"), [
    ("a" * 64, "a" * 64, True),
    ("a" * 64, "b" * 64, False),  # the classifier was retrained (a newer code version, another cache)
    (None, "b" * 64, False),  # a champion registered before the tag: its feature space is unknown
    ("a" * 64, None, False),
])
def test_a_fid_is_compared_as_it_stands_only_with_one_in_the_same_feature_space(
        fake_mlflow, versions, champion_network, candidate_network, alike):
    for version, gate, network in (("1", 12.0, champion_network), ("2", 10.0, candidate_network)):
        versions[version] = _Version(version, gate, "fid", **({NETWORK: network} if network else {}))
    asked = []

    def reevaluate(mv):
        asked.append(str(mv.version))
        return 9.0  # the champion, measured as the candidate was: better than it after all

    decision = registry.promote("digits-gan", "2", reevaluate=reevaluate)
    if alike:
        assert asked == [] and (decision.alias, decision.champion_value) == ("champion", 12.0)
        assert "on the same test snapshot" in decision.reason
    else:
        assert asked == ["1"] and (decision.alias, decision.champion_value) == ("challenger", 9.0)
        assert "re-evaluated" in decision.reason
        kept = registry.promote("digits-gan", "2", reevaluate=lambda mv: None)
        assert kept.alias == "challenger" and "in another domain classifier's feature space" in kept.reason
    assert fake_mlflow["champion"] == ("2" if alike else "1")


def test_an_nll_is_compared_as_it_stands_whatever_the_feature_networks(fake_mlflow, versions):
    versions["1"].tags[NETWORK], versions["2"].tags[NETWORK] = "a" * 64, "b" * 64
    decision = registry.promote("digits-vae", "2", reevaluate=lambda mv: pytest.fail("nothing to re-evaluate"))
    assert (decision.alias, decision.champion_value) == ("champion", 50.0)


def test_a_rerun_that_finds_its_version_already_champion_is_not_reported_as_a_promotion(tmp_path, fake_mlflow):
    """A scheduled retrain that changed nothing finds the same version, champion since an earlier
    run: not promoted now. The version this run registered, found champion by a retried promotion
    step (the first try moved the alias), was promoted by this run."""
    registry.promote("digits-vae", "2", lease_storage=(tmp_path / "store").as_uri())
    again = registry.promote("digits-vae", "2", lease_storage=(tmp_path / "store").as_uri()).to_dict()
    registered = {"name": "digits-vae", "version": "2", "gate_metric": "nll_nats", "gate_value": 40.0}
    rerun = records.family_outcome({"registered": {**registered, "created": False}, "promotion": again})
    assert (rerun["promoted"], rerun["alias"]) == (False, "champion")
    retried = records.family_outcome({"registered": {**registered, "created": True}, "promotion": again})
    assert (retried["promoted"], retried["previous_champion"]) == (True, "1")

"""The GENMODELS_* settings as an operator meets them: refusals name the variable they set."""

import pytest

from genmodels.config import get_settings


def test_a_variable_that_does_not_parse_is_refused_naming_the_variable_and_its_value(monkeypatch):
    monkeypatch.setenv("GENMODELS_MAX_ACTIVE_JOBS", "two")
    monkeypatch.setenv("GENMODELS_JOB_MAX_SAMPLES", "0")
    with pytest.raises(ValueError) as refused:
        get_settings()
    message = str(refused.value)
    assert message.startswith("GENMODELS_MAX_ACTIVE_JOBS='two': Input should be a valid integer")
    assert "; GENMODELS_JOB_MAX_SAMPLES='0': Input should be greater than or equal to 1" in message
    assert "max_active_jobs" not in message  # the field's name is not what the operator set


def test_a_refusal_never_echoes_a_field_kept_out_of_reprs(monkeypatch):
    from genmodels.config import Settings

    # api_key is a str and parses from any text: a stricter field kept out of reprs stands in.
    monkeypatch.setattr(Settings.model_fields["max_active_jobs"], "repr", False)
    monkeypatch.setenv("GENMODELS_MAX_ACTIVE_JOBS", "s3cret")
    with pytest.raises(ValueError, match=r"^GENMODELS_MAX_ACTIVE_JOBS: Input should be a valid integer") as refused:
        get_settings()
    assert "s3cret" not in str(refused.value)


def test_unset_and_empty_variables_read_as_the_embedded_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("GENMODELS_WORK_DIR", str(tmp_path))
    monkeypatch.setenv("GENMODELS_STORAGE", "")  # docker compose's `${VAR:-}`
    monkeypatch.delenv("GENMODELS_MAX_ACTIVE_JOBS", raising=False)
    settings = get_settings()
    assert settings.storage_url == (tmp_path / "store").as_uri() and settings.max_active_jobs == 2

"""ReconstructionSettings: the one source of defaults and limits, and how a reconstruction
takes them."""

import numpy as np
import pytest

from bcdi_bluesky import (
    BCDIError,
    DataError,
    ReconstructionSettings,
    Reconstructor,
    SettingsError,
)
from bcdi_bluesky.physics import check_volume


def test_defaults_limits_and_docs_come_from_one_place():
    info = {i.name: i for i in ReconstructionSettings.fields_info()}
    defaults = ReconstructionSettings()
    for name, item in info.items():
        assert getattr(defaults, name) == item.default
        assert item.doc, f"{name} has no help text"
        assert isinstance(getattr(defaults, name), item.kind)
        if item.kind is not bool:
            assert item.low is not None and item.high is not None
            assert item.low <= item.default <= item.high
    assert info["es_time_budget_s"].units == "s"


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"es_time_budget_s": float("nan")}, "finite"),
        ({"es_time_budget_s": -1.0}, "limits"),
        ({"polish_iterations": 10**9}, "limits"),
        ({"polish_iterations": 1.5}, "whole number"),
        ({"polish_iterations": "many"}, "number"),
        ({"seed": True}, "number"),
        ({"track": 2}, "true or false"),
        ({"support_threshold": 0.0}, "limits"),
        ({"not_a_setting": 1}, "unknown"),
    ],
)
def test_bad_values_are_refused_with_the_reason(changes, match):
    with pytest.raises(SettingsError, match=match) as caught:
        ReconstructionSettings().replace(**changes)
    assert isinstance(caught.value, BCDIError) and isinstance(caught.value, ValueError)


def test_replace_returns_a_validated_copy():
    base = ReconstructionSettings()
    changed = base.replace(polish_iterations=20.0, track=1)
    assert changed.polish_iterations == 20 and isinstance(changed.polish_iterations, int)
    assert changed.track is True
    assert base.polish_iterations == 150  # frozen: the original is untouched
    with pytest.raises(AttributeError):
        base.polish_iterations = 3  # type: ignore[misc]
    assert changed.as_dict()["polish_iterations"] == 20


def test_reconstructor_keeps_its_settings_and_a_call_may_use_others(scan54_64):
    rec = Reconstructor(es_time_budget_s=20.0, support_threshold=0.35)
    assert rec.settings.es_time_budget_s == 20.0
    assert rec.settings.support_threshold == pytest.approx(0.35)
    with pytest.raises(SettingsError):
        Reconstructor(es_time_budget_s=-5)
    own = rec.reconstruct(scan54_64, refine="none")
    assert own.settings == rec.settings
    assert own.summary()["settings"]["support_threshold"] == pytest.approx(0.35)
    other = rec.settings.replace(support_threshold=0.6)
    result = rec.reconstruct(scan54_64, refine="none", settings=other)
    assert result.settings is other
    amp = np.abs(result.object)
    np.testing.assert_array_equal(result.support, amp > 0.6 * amp.max())
    assert result.support.sum() < own.support.sum()
    assert rec.settings.support_threshold == pytest.approx(0.35)  # the engine kept its own


def test_volume_checks_raise_data_errors():
    with pytest.raises(DataError, match="float32"):
        check_volume(np.full((4, 4, 4), 1e300))
    with pytest.raises(DataError, match="NaN or inf"):
        check_volume(np.full((4, 4, 4), np.inf))
    with pytest.raises(DataError, match="3D"):
        check_volume(np.ones((4, 4)))

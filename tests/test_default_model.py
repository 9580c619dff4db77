"""The committed default model: it loads, matches its card, and really learned."""

import json

import numpy as np
import pytest

from bcdi_bluesky.model.evaluate import validate
from bcdi_bluesky.model.runtime import (
    DEFAULT_MODEL_NAME,
    OnnxCrystalModel,
    default_model_path,
    models_dir,
    sha256_of,
)


@pytest.fixture(scope="module")
def runtime():
    return OnnxCrystalModel(providers=["CPUExecutionProvider"])


def test_card_matches_the_committed_file(runtime):
    path = models_dir() / f"{DEFAULT_MODEL_NAME}.onnx"
    assert default_model_path() == path
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["sha256"] == sha256_of(path)
    assert card["input"]["shape"][1:] == [1, 64, 64, 64]
    assert card["parameters"]["names"] == runtime.crystal_model.names
    for key in ("samples", "steps", "seed", "wall_time_s", "machine"):
        assert key in card["training"]
    v = card["validation"]
    assert v["count"] == 500 and v["photons"] == 1e8
    for key in ("iou_median", "iou_p10", "chi_median"):
        assert 0 < v[key] < 1


def test_beats_the_trivial_predictor_by_a_wide_margin(runtime):
    """32 fresh crystals (a seed used nowhere else) at 1e8 photons, CNN only."""
    model = runtime.crystal_model
    mean = np.array(runtime.card["training_mean"])
    learned = validate(runtime.predict, model, 32, seed=424242)
    trivial = validate(lambda x: np.tile(mean, (len(x), 1)), model, 32, seed=424242)
    assert np.median(learned.iou) > np.median(trivial.iou) + 0.15
    assert np.median(learned.iou) > 0.7
    assert np.median(learned.chi) < np.median(trivial.chi) - 0.05
    # Not one lucky crystal: it wins on most of them.
    assert np.mean(learned.iou > trivial.iou) > 0.8

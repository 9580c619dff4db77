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


def _card_cases():
    """(id, change to the committed card's JSON text or object, words the error names)."""
    from bcdi_bluesky.physics import CrystalModel

    def set_in(path, value):
        def change(card):
            *keys, last = path.split(".")
            node = card
            for key in keys:
                node = node[key]
            if value is _DELETE:
                del node[last]
            else:
                node[last] = value
            return card

        return change

    smaller = CrystalModel(n=64, lmax=3, n_rbf=3, phase_order=3)
    return [
        ("not-utf8", lambda text: b"\xff\xfe" + text.encode(), "not UTF-8"),
        ("bare-number", lambda text: b"42", "must be a JSON object, got int"),
        ("list", lambda text: b"[1, 2]", "must be a JSON object, got list"),
        ("no-input-shape", set_in("input.shape", _DELETE), "lacks the field 'input.shape'"),
        ("input-shape-text", set_in("input.shape", "64^3"), "'input.shape' must be list"),
        ("input-shape-rank", set_in("input.shape", ["batch", 1, 64, 64]), "batch, 1, N, N, N"),
        ("names-null", set_in("parameters.names", None), "'parameters.names' must be list"),
        ("names-wrong", set_in("parameters.names", ["radius"]), "names"),
        ("lmax-float", set_in("parameters.lmax", 4.5), "'parameters.lmax' must be int"),
        ("sha-number", set_in("sha256", 7), "'sha256' must be str"),
        ("no-encoding", set_in("output", {}), "lacks the field 'output.encoding'"),
        ("unknown-encoding", set_in("output.encoding", "magic_v9"), "unknown output encoding"),
        ("latent-not-object", set_in("latent", [1, 2]), "'latent' must be dict"),
        ("latent-mean-text", set_in("latent.mean", "zero"), "'latent.mean' must be list"),
        ("latent-scale-null", set_in("latent.scale", None), "'latent.scale' must be int or float"),
        (
            "latent-precision-shape",
            set_in("latent.precision", [[1.0, 0.0], [0.0, 1.0]]),
            "'latent.precision' has shape (2, 2)",
        ),
        ("latent-ragged", set_in("latent.points", [[0.0, 1.0], [2.0]]), "model card"),
        ("graph-input", set_in("input.shape", ["batch", 1, 32, 32, 32]), "takes input shape"),
        ("output-shape", set_in("output.shape", ["batch", 100]), "'output.shape'"),
        (
            "layout-vs-output",
            lambda card: {**card, "parameters": smaller.to_dict()},
            "outputs shape ['batch', 125]",
        ),
    ]


_DELETE = object()


@pytest.mark.parametrize("case", _card_cases(), ids=lambda case: case[0])
def test_every_malformed_card_is_one_model_error_line(case, tmp_path):
    from bcdi_bluesky.model.runtime import ModelError

    _, change, words = case
    original = models_dir() / f"{DEFAULT_MODEL_NAME}.onnx"
    onnx = tmp_path / "m.onnx"
    onnx.symlink_to(original)  # the same graph, so the card's sha256 still matches
    text = original.with_suffix(".json").read_text()
    try:
        changed = change(text)  # a change of the raw bytes
    except TypeError:
        changed = json.dumps(change(json.loads(text))).encode()
    onnx.with_suffix(".json").write_bytes(changed)
    with pytest.raises(ModelError) as caught:
        OnnxCrystalModel(onnx, providers=["CPUExecutionProvider"], warmup=False)
    message = str(caught.value)
    assert "\n" not in message and ("m.json" in message or "m.onnx" in message), message
    assert words in message, message

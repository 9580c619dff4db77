"""Network, training, export and runtime on a small (32^3) model: fast and deterministic."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bcdi_bluesky.model.encoding import TwinBlockEncoding, TwinInvariantEncoding  # noqa: E402
from bcdi_bluesky.model.export import export_onnx  # noqa: E402
from bcdi_bluesky.model.runtime import ModelError, OnnxCrystalModel, load_card, sha256_of  # noqa: E402
from bcdi_bluesky.model.train import TrainConfig, build_network, load_checkpoint, train  # noqa: E402

SMALL = dict(
    name="tiny",
    grid=32,
    width=4,
    hidden=16,
    batch_size=2,
    steps=4,
    warmup_steps=2,
    validate_every=4,
    checkpoint_every=2,
    validation_size=2,
    friedel=False,
    zoom=0,
    mirror_copies=1,
)


@pytest.mark.parametrize("encoding", [TwinInvariantEncoding, TwinBlockEncoding])
def test_encoding_round_trip_and_twin_invariance(model64, prior64, encoding):
    enc = encoding(model64)
    rng = np.random.default_rng(0)
    p = np.array([model64.normalise(prior64.sample(rng)) for _ in range(10)])
    e = enc.encode(p)
    np.testing.assert_allclose(enc.encode(p * model64.twin_signs), e, atol=1e-12)
    back = enc.decode(e)
    err = np.minimum(
        np.abs(back - p).max(axis=1), np.abs(back - p * model64.twin_signs).max(axis=1)
    )
    if encoding is TwinInvariantEncoding:
        assert err.max() < 1e-9
    for k in range(len(p)):
        # One of the sign variants is the crystal or its twin.
        errs = [
            min(np.abs(v - p[k]).max(), np.abs(v - p[k] * model64.twin_signs).max())
            for v in enc.twin_variants(back[k])
        ]
        assert len(errs) == 2 ** (len(enc.blocks) - 1) and min(errs) < 1e-9
    with pytest.raises(ValueError, match="length"):
        enc.decode(np.zeros(3))


@pytest.mark.parametrize("encoding", [TwinInvariantEncoding, TwinBlockEncoding])
def test_symmetries_act_linearly_on_the_encoding(model64, prior64, encoding):
    enc = encoding(model64)
    rng = np.random.default_rng(2)
    p = np.array([model64.normalise(prior64.sample(rng)) for _ in range(4)])
    for g in [((0, 1, 2), (1,)), ((2, 0, 1), (0, 2)), ((1, 0, 2), ())]:
        a = model64.symmetry_matrix(*g)
        np.testing.assert_allclose(
            enc.encode(p @ a.T), enc.encode(p) @ enc.symmetry_map(a).T, atol=1e-12
        )
    mixing = np.eye(model64.size)
    mixing[[0, 6], [6, 0]] = 1.0  # radius with an l = 3 term
    with pytest.raises(ValueError, match="mixes"):
        enc.symmetry_map(mixing)


def test_twin_blocks_separate_the_odd_families(model64):
    enc = TwinBlockEncoding(model64)
    names = [[model64.names[i] for i in b] for b in enc.blocks]
    assert [n[0] for n in names] == ["sh_l3_m-3", "rbf0_cz", "phase_zz"]
    assert sorted(np.concatenate(enc.blocks).tolist()) == enc.odd.tolist()
    # A shape block alone is sign-free: its matrix does not change when only it flips.
    rng = np.random.default_rng(1)
    p = rng.uniform(-1, 1, model64.size)
    q = p.copy()
    q[enc.blocks[0]] *= -1
    np.testing.assert_allclose(enc.encode(q), enc.encode(p), atol=1e-12)
    assert not np.allclose(
        TwinInvariantEncoding(model64).encode(q), TwinInvariantEncoding(model64).encode(p)
    )


def test_mirrored_copies_are_valid_samples(model64, prior64):
    from bcdi_bluesky.model.data import TRAIN_STREAM, make_batch, mirrored_copies
    from bcdi_bluesky.physics import intensity
    from bcdi_bluesky.preprocess import network_input

    x, y = make_batch(model64, prior64, 0, TRAIN_STREAM, 0, 2)
    xs, ys = mirrored_copies(model64, x, y, 3, np.random.default_rng(0))
    assert xs.shape == (6, 1, 64, 64, 64) and ys.shape == (6, model64.size)
    assert xs.dtype == x.dtype and ys.dtype == y.dtype

    def noise_free(normalised):
        obj = model64.voxelise(model64.denormalise(normalised))
        return network_input(intensity(obj) * 1e8).ravel()

    def match(inputs, normalised):
        return np.corrcoef(inputs.ravel(), noise_free(normalised))[0, 1]

    for k in range(6):
        # Each copy is the measurement of the crystal its parameters describe: it matches that
        # crystal's noise-free intensity exactly as well as the original matches its own, and
        # better than it matches the unmirrored crystal.
        own = match(xs[k, 0], ys[k])
        assert abs(own - match(x[k // 3, 0], y[k // 3])) < 1e-6
        if not np.array_equal(ys[k], y[k // 3]):
            assert own > match(xs[k, 0], y[k // 3]) + 0.01
    # Three distinct mirror images of each crystal.
    assert len({ys[k].tobytes() for k in range(3)}) == 3
    with pytest.raises(ValueError, match="copies"):
        mirrored_copies(model64, x, y, 9, np.random.default_rng(0))
    with pytest.raises(ValueError, match="mirror_copies"):
        TrainConfig(**{**SMALL, "mirror_copies": 3})


def test_friedel_channel_warm_start_keeps_the_old_network(tmp_path):
    old_state = train(
        TrainConfig(**{**SMALL, "encoding": "normalised_v1"}),
        tmp_path / "a",
        workers=0,
        progress=False,
    )
    config = TrainConfig(**{**SMALL, "friedel": True, "mirror_copies": 2})
    net = build_network(config).eval()
    assert net.encoder[0].in_channels == 2
    from bcdi_bluesky.model.train import warm_start

    warm_start(net, tmp_path / "a" / "tiny" / "last.pt", config)
    old = build_network(TrainConfig.from_checkpoint(old_state["config"])).eval()
    old.load_state_dict(old_state["model"])
    x = torch.rand(2, 1, 32, 32, 32)
    enc = config.output_encoding()
    with torch.no_grad():
        new, before = net(x), old(x)
    np.testing.assert_allclose(new[:, : enc.n_even].numpy(), before[:, enc.even].numpy(), atol=1e-6)
    # The Friedel channel is I(q) - I(-q): zero for a centrosymmetric input, so such an input
    # gives the same output whatever the channel's weights.
    with torch.no_grad():
        net.encoder[0].weight[:, 1:].normal_()
        sym = x + torch.roll(torch.flip(x, (2, 3, 4)), (1, 1, 1), (2, 3, 4))
        np.testing.assert_allclose(
            net(sym)[:, : enc.n_even].numpy(), old(sym)[:, enc.even].numpy(), atol=1e-5
        )
    # ... and a training run with it (and mirrored copies) goes through.
    state = train(config, tmp_path / "b", workers=0, progress=False)
    assert state["step"] == 4 and state["config"]["friedel"]


def test_zoom_encoder_warm_start_keeps_the_dense_layer(tmp_path):
    old_state = train(TrainConfig(**SMALL), tmp_path / "a", workers=0, progress=False)
    config = TrainConfig(**{**SMALL, "zoom": 16})
    net = build_network(config)
    from bcdi_bluesky.model.train import warm_start

    warm_start(net, tmp_path / "a" / "tiny" / "last.pt", config)
    old = old_state["model"]["head.2.weight"]
    new = net.state_dict()["head.2.weight"]
    assert new.shape[1] > old.shape[1]
    np.testing.assert_array_equal(new[:, : old.shape[1]].numpy(), old.numpy())
    assert net(torch.rand(2, 1, 32, 32, 32)).shape == (2, config.output_encoding().size)
    with pytest.raises(ValueError, match="zoom"):
        build_network(TrainConfig(**{**SMALL, "zoom": 12}))


def test_mirror_average_is_equivariant(model64):
    # The averaged network's prediction for a mirrored (or transposed) measurement is the
    # mirrored prediction: exactly, whatever the weights.
    from bcdi_bluesky.model.network import HALF_TURN_Y, HALF_TURNS, MIRRORS, SymmetryAverage
    from bcdi_bluesky.physics import cube_symmetry

    config = TrainConfig(**{**SMALL, "friedel": True})
    torch.manual_seed(1)
    net = build_network(config).eval()
    enc = config.output_encoding()
    assert len(HALF_TURNS) == 4 and set(HALF_TURNS) < set(MIRRORS)
    assert set(HALF_TURN_Y) < set(HALF_TURNS)
    for group in (MIRRORS, HALF_TURNS, HALF_TURN_Y, [((0, 1, 2), ()), ((1, 0, 2), ())]):
        avg = SymmetryAverage(net, enc, group).eval()
        x = torch.rand(2, 1, 32, 32, 32)
        for g in group:
            mirrored = torch.from_numpy(np.ascontiguousarray(cube_symmetry(x.numpy(), *g)))
            with torch.no_grad():
                expected = avg(x).numpy() @ enc.symmetry_map(enc.model.symmetry_matrix(*g)).T
                np.testing.assert_allclose(avg(mirrored).numpy(), expected, atol=1e-5)
    with torch.no_grad():  # and it differs from the bare network (an untrained one is not)
        assert not np.allclose(SymmetryAverage(net, enc)(x).numpy(), net(x).numpy(), atol=1e-3)


def test_training_resumes_exactly(tmp_path):
    straight = train(TrainConfig(**SMALL), tmp_path / "a", workers=0, progress=False)
    first = TrainConfig(**{**SMALL, "steps": 2})
    train(first, tmp_path / "b", workers=0, progress=False)
    resumed = train(TrainConfig(**SMALL), tmp_path / "b", resume=True, workers=0, progress=False)
    assert resumed["step"] == straight["step"] == 4
    for key, value in straight["model"].items():
        np.testing.assert_allclose(
            resumed["model"][key].numpy(), value.numpy(), atol=1e-6, err_msg=key
        )
    assert resumed["history"][-1]["step"] == 4
    assert load_checkpoint(tmp_path / "b" / "tiny" / "last.pt")["step"] == 4


def test_export_writes_a_complete_card(tmp_path):
    from bcdi_bluesky.model.export import export

    config = TrainConfig(**{**SMALL, "friedel": True, "mirror_copies": 2})
    train(config, tmp_path, workers=0, progress=False)
    card = export(
        tmp_path / "tiny" / "last.pt", tmp_path / "models", validation_count=4, latent_count=24
    )
    onnx_path = tmp_path / "models" / "tiny.onnx"
    assert card == load_card(onnx_path)
    assert card["sha256"] == sha256_of(onnx_path)
    assert card["network"]["friedel"] is True and card["output"]["encoding"] == config.encoding
    assert card["network"]["symmetry_average"] == 4
    with pytest.raises(ValueError, match="symmetry_average"):
        export(tmp_path / "tiny" / "last.pt", tmp_path / "models", symmetry_average="cubic")
    assert card["training"]["steps"] == 4 and card["training"]["samples"] == 8
    assert card["training"]["crystals"] == 4
    assert card["validation"]["count"] == 4 and 0.0 <= card["validation"]["iou_median"] <= 1.0
    assert card["latent"]["calibration"]["crystals"] == 24
    runtime = OnnxCrystalModel(onnx_path, providers=["CPUExecutionProvider"])
    latent_map = runtime.latent_map
    assert latent_map is not None and latent_map.points.shape == (24, 2)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """A randomly initialised small network (with the Friedel channel and the zoom encoder,
    averaged over the mirrors: all in the ONNX graph) exported with a valid card."""
    from bcdi_bluesky.model.network import SymmetryAverage

    folder = tmp_path_factory.mktemp("models")
    config = TrainConfig(**{**SMALL, "friedel": True, "zoom": 16})
    torch.manual_seed(0)
    net = SymmetryAverage(build_network(config), config.output_encoding()).eval()
    path = folder / "tiny.onnx"
    export_onnx(net, config.grid, path)
    card = {
        "name": "tiny",
        "sha256": sha256_of(path),
        "input": {"shape": ["batch", 1, 32, 32, 32]},
        "output": {"encoding": config.encoding},
        "parameters": config.crystal_model().to_dict(),
    }
    path.with_suffix(".json").write_text(json.dumps(card))
    return net, path


def test_torch_and_onnx_runtime_agree(tiny_onnx):
    net, path = tiny_onnx
    runtime = OnnxCrystalModel(path, providers=["CPUExecutionProvider"])
    assert runtime.provider == "CPUExecutionProvider"
    x = np.random.default_rng(1).uniform(size=(3, 1, 32, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    raw = runtime.session.run(None, {runtime.input_name: x})[0]
    assert np.abs(raw - expected).max() <= 1e-4
    decoded = runtime.predict(x[:, 0])
    assert decoded.shape == (3, runtime.crystal_model.size)
    np.testing.assert_allclose(decoded, runtime.encoding.decode(expected), atol=1e-3)
    # Batch 1, a single volume, and a big-endian copy give the same answer.
    single = runtime.predict(x[0, 0])
    np.testing.assert_allclose(single, decoded[0], atol=1e-5)
    np.testing.assert_allclose(runtime.predict(x[0, 0].astype(">f4")), single, atol=1e-6)
    with pytest.raises(ValueError, match="network input"):
        runtime.predict(np.zeros((16, 16, 16)))
    bad = x[0, 0].copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        runtime.predict(bad)


def test_missing_corrupt_or_mismatched_models_name_the_file(tiny_onnx, tmp_path):
    _, path = tiny_onnx
    with pytest.raises(ModelError, match="not found"):
        OnnxCrystalModel(tmp_path / "nothing.onnx")
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(path.read_bytes())
    with pytest.raises(ModelError, match="card not found"):
        load_card(copy)
    card = json.loads(path.with_suffix(".json").read_text())
    copy.with_suffix(".json").write_text(json.dumps({**card, "sha256": "0" * 64}))
    with pytest.raises(ModelError, match=r"copy\.onnx does not match"):
        OnnxCrystalModel(copy)
    copy.write_bytes(b"not an onnx file")
    copy.with_suffix(".json").write_text(json.dumps({**card, "sha256": sha256_of(copy)}))
    with pytest.raises(ModelError, match=r"cannot load model .*copy\.onnx"):
        OnnxCrystalModel(copy)
    copy.with_suffix(".json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        OnnxCrystalModel(copy)


def test_cli_trains_what_python_trains():
    # One source of defaults: `bcdi-bluesky train` with no options is TrainConfig().
    from dataclasses import fields

    from bcdi_bluesky.cli import build_parser

    args = vars(build_parser().parse_args(["train"]))
    defaults = TrainConfig()
    shared = [f.name for f in fields(TrainConfig) if f.name in args]
    assert len(shared) >= 12
    for name in shared:
        assert args[name] == getattr(defaults, name), name
    # `bcdi-bluesky distil` has the defaults of distil() (torch-free: DISTIL_DEFAULTS).
    import inspect

    from bcdi_bluesky.model.distil import distil

    args = vars(build_parser().parse_args(["distil", "--teacher", "t.onnx", "--steps", "1"]))
    checked = 0
    for name, parameter in inspect.signature(distil).parameters.items():
        if parameter.default is not inspect.Parameter.empty and name in args:
            assert args[name] == parameter.default, name
            checked += 1
    assert checked >= 8
    # A checkpoint that predates a feature loads with the feature off, not today's default.
    old = TrainConfig.from_checkpoint({"name": "old", "grid": 32})
    assert (old.friedel, old.zoom, old.mirror_copies) == (False, 0, 1)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A small network with non-trivial BatchNorm statistics, exported averaged over the half
    turns with its card (as ``export`` writes it): a teacher to distil."""
    from bcdi_bluesky.model.export import export

    folder = tmp_path_factory.mktemp("teacher")
    config = TrainConfig(**{**SMALL, "friedel": True, "zoom": 16, "batch_size": 4})
    torch.manual_seed(3)
    net = build_network(config)
    with torch.no_grad():  # BatchNorm that is not the identity: folding must carry it
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    from dataclasses import asdict

    checkpoint = folder / "last.pt"
    torch.save(
        {"config": asdict(config), "model": net.state_dict(), "step": 0, "elapsed_s": 0.0},
        checkpoint,
    )
    export(checkpoint, folder, "teacher", validation_count=2, latent_count=0)
    return net.eval(), config, folder / "teacher.onnx"


def test_network_from_onnx_rebuilds_the_bare_network(tiny_teacher, tmp_path):
    import onnxruntime as ort

    from bcdi_bluesky.model.distil import GroupAverageTeacher, network_from_onnx
    from bcdi_bluesky.model.network import HALF_TURNS, SymmetryAverage
    from bcdi_bluesky.physics import mirror

    original, _, path = tiny_teacher
    net, rebuilt, symmetries = network_from_onnx(path)
    assert symmetries == HALF_TURNS
    assert (rebuilt.grid, rebuilt.width, rebuilt.zoom, rebuilt.friedel) == (32, 4, 16, True)
    x = np.random.default_rng(5).uniform(size=(2, 1, 32, 32, 32)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(
            net(torch.from_numpy(x)).numpy(), original(torch.from_numpy(x)).numpy(), atol=1e-5
        )
    # The teacher's average for every half-turn view of a crystal, from one pass per view,
    # is what the exported model computes for that view.
    views = np.concatenate([[mirror(v, flips) for _, flips in HALF_TURNS] for v in x])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"intensity": views.astype(np.float32)})[0]
    teacher = GroupAverageTeacher(net, rebuilt.output_encoding(), symmetries)
    assert np.abs(teacher(torch.from_numpy(views)).numpy() - expected).max() < 1e-5
    with torch.no_grad():
        average = SymmetryAverage(net, rebuilt.output_encoding(), symmetries).eval()
        assert np.abs(average(torch.from_numpy(views)).numpy() - expected).max() < 1e-5
    # A card that does not describe the weights is refused.
    card = json.loads(path.with_suffix(".json").read_text())
    card["network"]["hidden"] = 8
    wrong = tmp_path / "wrong.onnx"
    wrong.write_bytes(path.read_bytes())
    wrong.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="shape"):
        network_from_onnx(wrong)


@pytest.mark.timeout(120)
def test_distillation_learns_the_average_and_resumes_exactly(tiny_teacher, tmp_path):
    from bcdi_bluesky.model.distil import GroupAverageTeacher, distil, network_from_onnx
    from bcdi_bluesky.model.network import WeightedMSE, parameter_weights
    from bcdi_bluesky.model.train import _BatchStream

    _, _, path = tiny_teacher
    recipe = dict(lr=3e-3, warmup_steps=1, truth_share=0.25, validate_every=3)
    recipe.update(checkpoint_every=2, validation_size=2, workers=0, progress=False)
    straight = distil(path, tmp_path / "a", steps=6, **recipe)
    # Interrupted after its first step (the time limit), then resumed.
    assert distil(path, tmp_path / "b", steps=6, time_limit_s=0.0, **recipe)["step"] == 1
    resumed = distil(path, tmp_path / "b", steps=6, resume=True, **recipe)
    assert resumed["step"] == straight["step"] == 6
    for key, value in straight["model"].items():
        np.testing.assert_allclose(
            resumed["model"][key].numpy(), value.numpy(), atol=1e-6, err_msg=key
        )
    assert [h["step"] for h in resumed["history"]] == [h["step"] for h in straight["history"]]
    assert [h["step"] for h in resumed["history"]] == [3, 6]
    # The distillation loss on the batches it saw fell: one pass now predicts more of what
    # the teacher's average predicts.
    net, config, symmetries = network_from_onnx(path)
    teacher = GroupAverageTeacher(net, config.output_encoding(), symmetries)
    stored = TrainConfig.from_checkpoint(straight["config"])
    encoding = stored.output_encoding()
    loss_fn = WeightedMSE(encoding.weights(parameter_weights(encoding.model)))
    student = build_network(stored)
    student.load_state_dict(straight["model"])
    student.eval()
    batches = _BatchStream(stored, 0)
    assert stored.mirror_copies == 4 and batches.stream == 5
    x = torch.cat([batches[i][0] for i in range(6)])
    with torch.no_grad():
        target = teacher(x)
        before, after = float(loss_fn(net(x), target)), float(loss_fn(student(x), target))
    assert after < 0.8 * before
    # The student's checkpoint exports as a one-pass model whose card names its teacher.
    from bcdi_bluesky.model.export import export

    card = export(
        tmp_path / "a" / f"{config.name}_distilled" / "last.pt",
        tmp_path / "models",
        validation_count=2,
        latent_count=0,
        symmetry_average="none",
    )
    assert "symmetry_average" not in card["network"]
    assert card["training"]["distillation"]["teacher"] == "teacher.onnx"
    assert card["training"]["distillation"]["truth_share"] == 0.25
    _, _, none = network_from_onnx(tmp_path / "models" / f"{config.name}_distilled.onnx")
    assert none == ()


def test_training_never_loses_a_run_silently(tmp_path, caplog):
    from bcdi_bluesky.errors import SettingsError

    train(TrainConfig(**SMALL), tmp_path, workers=0, progress=False)
    last = tmp_path / "tiny" / "last.pt"
    before = last.read_bytes()
    with pytest.raises(SettingsError, match=r"exists: resume \(--resume\) .* overwrite"):
        train(TrainConfig(**{**SMALL, "steps": 2}), tmp_path, workers=0, progress=False)
    assert last.read_bytes() == before
    again = train(
        TrainConfig(**{**SMALL, "steps": 2}), tmp_path, workers=0, progress=False, overwrite=True
    )
    assert again["step"] == 2
    # Resumed with other options: the stored ones are kept, and one warning names them.
    with caplog.at_level("WARNING", logger="bcdi_bluesky.model.train"):
        resumed = train(
            TrainConfig(**{**SMALL, "steps": 3, "batch_size": 8, "lr": 0.01}),
            tmp_path,
            resume=True,
            workers=0,
            progress=False,
        )
    assert resumed["step"] == 3 and resumed["config"]["batch_size"] == SMALL["batch_size"]
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "batch_size" in line and "lr" in line and "steps" not in line
    # The loss's moving average is checkpointed: the resumed run logs what a straight one does.
    assert resumed["running_loss"] is not None


@pytest.mark.parametrize(
    "content", [b"", b"not a checkpoint at all", None], ids=["empty", "bytes", "no-step"]
)
def test_a_bad_checkpoint_is_a_model_error(tmp_path, content):
    import torch

    path = tmp_path / "tiny" / "last.pt"
    path.parent.mkdir()
    if content is None:
        torch.save({"config": {}, "model": {}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ModelError, match="not a checkpoint written by train"):
        train(TrainConfig(**SMALL), tmp_path, resume=True, workers=0, progress=False)
    with pytest.raises(ModelError, match=r"no checkpoint at .* \(a folder\)"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "change",
    [{"batch_size": 0}, {"steps": -5}, {"lr": float("nan")}, {"zoom": 7}, {"width": 0}],
)
def test_a_run_that_cannot_train_is_refused_before_any_work(change):
    from bcdi_bluesky.errors import SettingsError

    with pytest.raises(SettingsError, match=next(iter(change))):
        TrainConfig(**{**SMALL, **change})


@pytest.mark.parametrize(
    "option",
    [
        {"workers": -1},
        {"workers": 1.5},
        {"threads": 0},
        {"time_limit_s": float("nan")},
        {"time_limit_s": -1.0},
    ],
)
def test_train_options_out_of_range_are_refused_before_any_work(tmp_path, option):
    from bcdi_bluesky.errors import SettingsError

    with pytest.raises(SettingsError, match=next(iter(option))):
        train(TrainConfig(**SMALL), tmp_path, progress=False, **option)
    assert not any(tmp_path.iterdir())  # no run folder, no checkpoint


@pytest.mark.timeout(300)
def test_export_replaces_a_model_only_when_complete(tmp_path, monkeypatch):
    import torch

    from bcdi_bluesky.errors import SettingsError
    from bcdi_bluesky.model import export as export_module

    train(TrainConfig(**SMALL), tmp_path, workers=0, progress=False)
    checkpoint, models = tmp_path / "tiny" / "last.pt", tmp_path / "models"
    small = dict(validation_count=2, latent_count=0)
    export_module.export(checkpoint, models, **small)
    pair = {p.name: p.read_bytes() for p in models.iterdir()}
    assert sorted(pair) == ["tiny.json", "tiny.onnx"]
    with pytest.raises(SettingsError, match=r"exists: overwrite \(--overwrite\)"):
        export_module.export(checkpoint, models, **small)
    with pytest.raises(SettingsError, match="latent_count"):
        export_module.export(checkpoint, models, validation_count=2, latent_count=3)
    with pytest.raises(SettingsError, match="validation_count must be a whole number >= 1"):
        export_module.export(checkpoint, models, validation_count=True, latent_count=0)
    broken = tmp_path / "broken.pt"
    torch.save({"config": {}, "model": {}}, broken)
    with pytest.raises(ModelError, match="no step"):
        export_module.export(broken, models, "tiny", overwrite=True, **small)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "validate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_module.export(checkpoint, models, overwrite=True, **small)
    # Nothing of the failed exports is left, and the model in place still loads.
    assert {p.name: p.read_bytes() for p in models.iterdir()} == pair
    OnnxCrystalModel(models / "tiny.onnx", providers=["CPUExecutionProvider"])
    monkeypatch.undo()
    card = export_module.export(checkpoint, models, overwrite=True, **small)
    assert card == load_card(models / "tiny.onnx") and sorted(p.name for p in models.iterdir()) == [
        "tiny.json",
        "tiny.onnx",
    ]


def test_training_cli_errors_are_one_line(tmp_path, capsys):
    from bcdi_bluesky.cli import main

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 10)
    cases = [
        (["train", "--batch-size", "0", "--checkpoints", str(tmp_path)], "batch_size"),
        (["train", "--workers", "-1"], "--workers"),
        (["export", "--checkpoint", str(bad), "--models-dir", str(tmp_path)], "not a checkpoint"),
        (["export", "--checkpoint", str(tmp_path), "--models-dir", str(tmp_path)], "a folder"),
    ]
    for argv, expected in cases:
        try:
            status = main(argv)
        except SystemExit as exc:  # argparse refuses an option value
            status = exc.code
        err = capsys.readouterr().err.strip()
        assert status == 2 and expected in err and "Traceback" not in err, err
        # One line (argparse puts its usage before it).
        assert err.splitlines()[-1].startswith("bcdi-bluesky "), err


_INTERRUPTED_RUN = """
import logging, sys
from pathlib import Path
from bcdi_bluesky.model.train import TrainConfig, train
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
config = TrainConfig(**{config})
train(config, Path(sys.argv[1]), workers=1, progress=False)
"""


@pytest.mark.timeout(180)
def test_ctrl_c_stops_training_with_a_checkpoint_it_resumes_from(tmp_path):
    """Ctrl-C from a terminal (SIGINT to the process group, data worker included) saves the
    step reached, not only the last periodic checkpoint, and the run resumes from it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    endless = {**SMALL, "steps": 10**6, "checkpoint_every": 10**6, "validate_every": 10**6}
    script = _INTERRUPTED_RUN.format(config=endless)
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        lines = []
        for line in proc.stderr:  # the handler is in place once the loop says it started
            lines.append(line)
            if "training tiny from step 0" in line:
                break
        else:
            pytest.fail("".join(lines))
        time.sleep(2.0)
        os.killpg(proc.pid, signal.SIGINT)
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = "".join(lines) + rest
    assert proc.returncode != 0, log  # KeyboardInterrupt goes on to the caller
    assert "interrupted at step" in log and "continue with --resume" in log, log
    assert "exited unexpectedly" not in log, log  # the data worker left Ctrl-C alone
    reached = load_checkpoint(tmp_path / "tiny" / "last.pt")["step"]
    assert reached >= 1  # no periodic checkpoint would exist before step 10**6
    # The stored run goes on (its 10**6 steps): one step, cut by the time limit.
    again = train(TrainConfig(**endless), tmp_path, resume=True, progress=False, time_limit_s=1e-9)
    assert again["step"] == reached + 1

"""data.val / data.test (which data judges what), data.input (inputs adapted to the model), the
memorised-validation warning and analyze's data flags (issue #12, items 1 and 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdcli.config.data import DataSpec, InputAdapt
from kdcli.config.recipe import parse_recipe
from kdcli.data.adapt import adapt_inputs
from kdcli.data.loader import load_data, memorised_warning, resolve_val
from kdcli.data.tensors import TensorData
from kdcli.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def ids(d: TensorData) -> list[int]:
    return d.x[:, 0, 0, 0].long().tolist()


def write(tmp_path: Path, n=40, n_test=20, name="d.pt", shape=(1, 2, 2), classes=3) -> dict:
    """Sample i of the training split has every value i; test sample j has every value 1000 + j."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, *shape).clone()
    blob = {"x": x, "y": torch.arange(n) % classes}
    if n_test:
        blob["x_test"] = (1000 + torch.arange(n_test, dtype=torch.float32)).view(n_test, 1, 1, 1).expand(n_test, *shape).clone()
        blob["y_test"] = torch.arange(n_test) % classes
    torch.save(blob, tmp_path / name)
    return {"kind": "tensors", "path": name}


def load(tmp_path, held_out=False, seed=0, **data):
    data.setdefault("normalize", "none")
    return load_data(DataSpec.model_validate(data), base_dir=tmp_path, seed=seed, held_out=held_out)


def test_a_teacher_kdcli_trains_validates_on_part_of_the_training_split(tmp_path):
    d = load(tmp_path, source=write(tmp_path))
    assert len(d.val) == 4 and len(d.train) == 36 and ids(d.test) == list(range(1000, 1020))
    assert set(ids(d.val)) | set(ids(d.train)) == set(range(40)) and not set(ids(d.val)) & set(ids(d.train))
    # the same indices as before data.val existed: a seeded permutation of the training split
    assert ids(d.val) == sorted(torch.randperm(40, generator=torch.Generator().manual_seed(0))[:4].tolist())
    assert "4 of the 40 train samples" in d.splits["val"]


def test_a_checkpoint_teacher_validates_on_half_of_the_held_out_split_disjoint_from_the_test_part(tmp_path):
    d = load(tmp_path, held_out=True, seed=3, source=write(tmp_path))
    assert ids(d.train) == list(range(40))  # the whole training split is the transfer set
    assert len(d.val) == 10 and len(d.test) == 10
    assert sorted(ids(d.val) + ids(d.test)) == list(range(1000, 1020))
    assert "10 of the 20 test samples" in d.splits["val"] and "disjoint" in d.splits["test"]
    other = load(tmp_path, held_out=True, seed=4, source=write(tmp_path))
    assert ids(other.val) != ids(d.val)  # seeded
    assert "validation: 10 of the 20 test samples" in d.judged_by() and "normalisation: none" in d.judged_by()


def test_explicit_val_and_test(tmp_path):
    src = write(tmp_path)
    d = load(tmp_path, held_out=True, source=src, val={"split": "train", "fraction": 0.25})
    assert len(d.val) == 10 and len(d.train) == 30 and len(d.test) == 20
    d = load(tmp_path, source=src, val="test")
    assert ids(d.val) == ids(d.test) == list(range(1000, 1020)) and len(d.train) == 40
    assert "the same data" in d.splits["val"]
    d = load(tmp_path, source=src, val={"split": "test", "fraction": 0.5}, test="none")
    assert d.test is None and len(d.val) == 10 and len(d.train) == 40
    # an explicit val_fraction is honoured even for a checkpoint teacher; 0 means the test split
    assert resolve_val(DataSpec.model_validate({"source": src, "val_fraction": 0.2}), True).split == "train"
    assert resolve_val(DataSpec.model_validate({"source": src, "val_fraction": 0}), False) == "test"


def test_val_and_test_from_other_sources(tmp_path):
    src = write(tmp_path)
    other = write(tmp_path, n=6, n_test=0, name="other.pt")
    d = load(tmp_path, source=src, val={"source": other}, test={"source": src, "split": "train"})
    assert ids(d.val) == list(range(6)) and "train split of tensors" in d.splits["val"]
    assert ids(d.test) == list(range(40))
    bad = write(tmp_path, n=6, n_test=0, name="bad.pt", classes=6)
    with pytest.raises(DataError, match=r"^data\.val: .*label 5.*3 classes"):
        load(tmp_path, source=src, val={"source": bad})
    wide = write(tmp_path, n=6, n_test=0, name="wide.pt", shape=(1, 3, 3))
    with pytest.raises(DataError, match=r"^data\.test: its inputs are \[1, 3, 3\].*data\.input"):
        load(tmp_path, source=src, test={"source": wide})


def test_no_held_out_split_falls_back_with_a_note_and_explicit_test_val_fails_naming_the_key(tmp_path):
    src = write(tmp_path, n_test=0)
    d = load(tmp_path, held_out=True, source=src)
    assert len(d.val) == 4 and d.test is None
    assert len(d.notes) == 1 and d.notes[0].startswith("data.val: ") and "memorised" in d.notes[0]
    with pytest.raises(DataError, match=r"^data\.val: .* has no test split"):
        load(tmp_path, source=src, val={"split": "test", "fraction": 0.5})
    with pytest.raises(DataError, match=r"^data\.val\.fraction: "):
        load(tmp_path, source=write(tmp_path, n_test=1, name="one.pt"), val={"split": "test", "fraction": 0.5})


def test_memorised_warning_fires_only_above_the_gap(tmp_path):
    d = load(tmp_path, source=write(tmp_path))
    assert memorised_warning(0.995, 0.915, d) is not None
    assert "99.5%" in memorised_warning(0.995, 0.915, d) and "data.val" in memorised_warning(0.995, 0.915, d)
    assert memorised_warning(0.94, 0.915, d) is None  # 2.5 points: noise, not memorisation
    assert memorised_warning(0.995, None, d) is None


def test_recipe_knows_when_the_teacher_was_trained_elsewhere():
    base = "data: {source: digits}\n"
    assert parse_recipe(base + "teacher: {model: mlp, checkpoint: t.kdc}\n").teacher_trained_elsewhere
    assert not parse_recipe(base + "teacher: {model: mlp}\n").teacher_trained_elsewhere


# ----------------------------------------------------------------------------- data.input


def test_pad_centres_the_image_with_zeros_and_crops_when_larger():
    x = torch.arange(1, 2 * 28 * 28 + 1, dtype=torch.float32).view(2, 1, 28, 28)
    out = adapt_inputs(TensorData(x, torch.zeros(2, dtype=torch.long)), InputAdapt(size=(32, 32), fit="pad"), "t").x
    assert out.shape == (2, 1, 32, 32)
    assert torch.equal(out[:, :, 2:30, 2:30], x)
    assert out[:, :, :2].abs().sum() == 0 and out[:, :, 30:].abs().sum() == 0 and out[..., :2].abs().sum() == 0
    back = adapt_inputs(TensorData(out, torch.zeros(2, dtype=torch.long)), InputAdapt(size=(28, 28), fit="pad"), "t").x
    assert torch.equal(back, x)


def test_resize_keeps_a_constant_image_constant_and_uint8_stays_uint8():
    x = torch.full((3, 3, 8, 8), 77, dtype=torch.uint8)
    out = adapt_inputs(TensorData(x, torch.zeros(3, dtype=torch.long)), InputAdapt(size=(16, 12)), "t").x
    assert out.dtype == torch.uint8 and out.shape == (3, 3, 16, 12) and bool((out == 77).all())


def test_channels_replicate_and_reduce_to_luminance():
    grey = torch.rand(2, 1, 4, 4)
    out = adapt_inputs(TensorData(grey, torch.zeros(2, dtype=torch.long)), InputAdapt(channels=3), "t").x
    assert out.shape == (2, 3, 4, 4) and all(torch.equal(out[:, c], grey[:, 0]) for c in range(3))
    rgb = torch.zeros(1, 3, 1, 1)
    rgb[0, :, 0, 0] = torch.tensor([100.0, 50.0, 10.0])
    luma = adapt_inputs(TensorData(rgb, torch.zeros(1, dtype=torch.long)), InputAdapt(channels=1), "t").x
    assert luma.shape == (1, 1, 1, 1) and luma.item() == pytest.approx(0.299 * 100 + 0.587 * 50 + 0.114 * 10)
    with pytest.raises(DataError, match=r"^data\.input\.channels: t has 2 channels"):
        adapt_inputs(TensorData(torch.zeros(1, 2, 2, 2), torch.zeros(1, dtype=torch.long)), InputAdapt(channels=3), "t")


def test_input_applies_to_every_split_and_other_sources(tmp_path):
    src = write(tmp_path, shape=(1, 2, 2))
    other = write(tmp_path, n=5, n_test=0, name="other.pt", shape=(1, 3, 3))
    d = load(tmp_path, source=src, val={"source": other}, input={"size": [4, 4], "fit": "pad", "channels": 3})
    assert d.input_shape == (3, 4, 4) and d.val.x.shape[1:] == (3, 4, 4) and d.test.x.shape[1:] == (3, 4, 4)
    assert torch.equal(d.test.x[0, :, 1:3, 1:3], torch.full((3, 2, 2), 1000.0))


def test_shape_mismatch_names_the_key_that_fixes_it(tmp_path):
    from kdcli.models.file import ModelInfo, check_model_fits

    d = load(tmp_path, source=write(tmp_path, shape=(1, 28, 28)))
    info = ModelInfo(name="lenet", args={}, input_shape=(3, 32, 32), num_classes=3)
    with pytest.raises(DataError, match=r"set data\.input: \{size: \[32, 32\], fit: pad, channels: 3\}"):
        check_model_fits(torch.nn.Identity(), info, d, torch.zeros(1, 3, 32, 32))


# ----------------------------------------------------------------------------- analyze --data flags


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "kdcli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_analyze_data_flags_choose_the_split_and_show_the_normalisation(tmp_path):
    src = write(tmp_path, n=60, n_test=40, shape=(1, 8, 8), classes=10)
    from kdcli.models.file import ModelInfo, save_model
    from kdcli.models import build_model

    model = build_model("mlp", {"hidden": [8]}, input_shape=(1, 8, 8), num_classes=10)
    save_model(tmp_path / "m.kdc", model, ModelInfo(name="mlp", args={"hidden": [8]},
                                                    input_shape=(1, 8, 8), num_classes=10))
    r = run_cli("analyze", "m.kdc", "--data", f"tensors:{src['path']}", "--normalize", "0.5/0.25", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stderr.splitlines() if l.startswith("data: "))
    assert "validation: 20 of the 40 test samples" in line and "mean (0.5), std (0.25) (data.normalize)" in line
    r = run_cli("analyze", "m.kdc", "--data", f"tensors:{src['path']}", "--val", "train:0.5", cwd=tmp_path)
    assert r.returncode == 0 and "validation: 30 of the 60 train samples" in r.stderr
    for args, where in ((["--val", "test:2"], "--val"), (["--normalize", "0.5"], "--normalize"),
                        (["--input-size", "8"], "--input-size"), (["--fit", "stretch", "--input-size", "8,8"], "--fit")):
        r = run_cli("analyze", "m.kdc", "--data", f"tensors:{src['path']}", *args, cwd=tmp_path)
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(f"error: {where}"), r.stderr
    r = run_cli("analyze", "m.kdc", "--val", "test", cwd=tmp_path)
    assert r.returncode == 2 and "--val: needs --data" in r.stderr


class _Mod3(torch.nn.Module):
    """Predicts (first input value) mod 3: right on write()'s training split, wrong on its test split."""

    def forward(self, x):
        return torch.nn.functional.one_hot(x[:, 0, 0, 0].round().long() % 3, 3).float()


def test_analyze_measures_the_test_part_and_warns_when_validation_looks_memorised(tmp_path):
    from kdcli.analyze.analysis import _judged
    from kdcli.console import Reporter
    from kdcli.train.loop import evaluate, tensor_batches

    d = load(tmp_path, source=write(tmp_path), val={"split": "train", "fraction": 0.25})
    model, notes = _Mod3(), []
    acc = evaluate(model, tensor_batches(*d.eval_tensors("val")), torch.device("cpu"))["accuracy"]
    assert acc == 1.0
    out = _judged(model, d, "val", acc, None, torch.device("cpu"), notes, Reporter(quiet=True))
    assert out["test_accuracy"] == 0.0 and "10 of the 40 train samples" in out["which"]
    assert len(notes) == 1 and "looks memorised" in notes[0] and "100.0% on validation" in notes[0]
    held = load(tmp_path, held_out=True, source=write(tmp_path))
    notes = []
    _judged(model, held, "val", 0.0, None, torch.device("cpu"), notes, Reporter(quiet=True))
    assert notes == []  # judged on held-out data: nothing memorised

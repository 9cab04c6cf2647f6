"""Checkpoints (kdcli.models.file): safe reading of user files in many layouts, kdcli model files."""

from __future__ import annotations

import zipfile

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from kdcli.models.file import (is_model_file, load_model, load_model_file, read_state_dict,
                              save_model_file)
from kdcli.errors import CheckpointError, ModelError
from kdcli.models import build_model

SPEC = ("cnn3", {"widths": [4, 8, 8], "hidden": 16})
SHAPE = (1, 12, 12)


@pytest.fixture(scope="module")
def source():
    """A small cnn3 with non-trivial BatchNorm statistics, and its outputs on a fixed batch."""
    torch.manual_seed(0)
    model = build_model(SPEC[0], SPEC[1], input_shape=SHAPE, num_classes=10)
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(16, *SHAPE) * 2 + 0.5)  # moves running_mean / running_var
    model.eval()
    x = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(1))
    return model, x, model(x).detach()


def _load(path, **kw):
    return load_model(SPEC[0], SPEC[1], path, input_shape=SHAPE, num_classes=10, **kw)


def _assert_same(model, source):
    _, x, ref = source
    assert not model.training
    assert torch.equal(model(x), ref)


def _sd(source):
    return {k: v.clone() for k, v in source[0].state_dict().items()}


@pytest.mark.parametrize("layout", ["plain", "state_dict", "model", "model_state_dict", "net", "module.",
                                    "_orig_mod.", "with-extras"])
def test_state_dict_layouts(tmp_path, source, layout):
    sd = _sd(source)
    if layout == "plain":
        obj = sd
    elif layout in ("module.", "_orig_mod."):
        obj = {layout + k: v for k, v in sd.items()}
    elif layout == "with-extras":  # a training checkpoint: epoch, optimizer state, then the weights
        obj = {"epoch": 7, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}, "state_dict": sd}
    else:
        obj = {layout: sd}
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    got = read_state_dict(path)
    assert set(got) == set(sd) and all(v.device.type == "cpu" for v in got.values())
    _assert_same(_load(path), source)


def test_legacy_non_zip_format(tmp_path, source):
    path = tmp_path / "legacy.pth"
    torch.save(_sd(source), path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    _assert_same(_load(path), source)


def test_pre_0_4_checkpoint_without_num_batches_tracked(tmp_path, source):
    sd = {k: v for k, v in _sd(source).items() if not k.endswith("num_batches_tracked")}
    assert len(sd) < len(source[0].state_dict())
    torch.save(sd, tmp_path / "old.pt")
    model = _load(tmp_path / "old.pt")
    _assert_same(model, source)
    assert int(model.conv1[1].num_batches_tracked) == 0


def test_safetensors(tmp_path, source):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in _sd(source).items()}, str(path))
    _assert_same(_load(path), source)
    renamed = tmp_path / "w.bin"  # recognised by content too
    renamed.write_bytes(path.read_bytes())
    _assert_same(_load(renamed), source)


def test_whole_pickled_module_needs_trust(tmp_path, source):
    path = tmp_path / "whole.pt"
    torch.save(source[0], path)
    with pytest.raises(CheckpointError) as err:
        _load(path)
    assert str(err.value) == (f"{path}: holds pickled objects (kdcli.models.zoo.CNN3) that can run code when "
                              "loaded (e.g. a whole nn.Module); pass --trust-checkpoint only if you trust its source")
    model = _load(path, trust=True)
    assert isinstance(model, nn.Module)
    _assert_same(model, source)
    torch.save({"epoch": 1, "model": source[0]}, tmp_path / "nested.pt")
    assert isinstance(read_state_dict(tmp_path / "nested.pt", trust=True), nn.Module)


def test_mismatched_checkpoint_lists_the_keys(tmp_path, source):
    sd = _sd(source)
    del sd["conv1.0.weight"]
    sd["extra.weight"] = torch.zeros(3)
    path = tmp_path / "t.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_model(SPEC[0], SPEC[1], path, input_shape=SHAPE, num_classes=12)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path} does not fit model cnn3: missing conv1.0.weight; unexpected extra.weight; ")
    assert "shape of fc2.weight is [12,16] in the model, [10,16] in the file" in msg
    assert "shape of fc2.bias is [12] in the model, [10] in the file" in msg


@pytest.mark.parametrize("content", [b"", b"hello, this is not a checkpoint" * 4, "truncated"])
def test_unreadable_files(tmp_path, source, content):
    path = tmp_path / "bad.pt"
    if content == "truncated":
        torch.save(_sd(source), path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        _load(path)
    assert str(err.value).startswith(f"{path}: not a readable PyTorch checkpoint") and "\n" not in str(err.value)


def test_missing_file_and_weightless_files(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pt: file not found"):
        _load(tmp_path / "nope.pt")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match="no state dict found .*top-level keys: epoch, lr"):
        read_state_dict(tmp_path / "meta.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list, expected a state dict"):
        read_state_dict(tmp_path / "list.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_state_dict(tmp_path / "bad.safetensors")


# --- kdcli model files ---------------------------------------------------------------------------

def _save(path, model, **kw):
    save_model_file(path, model, name=SPEC[0], args=SPEC[1], input_shape=SHAPE, num_classes=10,
                    pruning_history=kw.pop("pruning_history", []), metadata=kw.pop("metadata", {}))


def test_model_file_round_trip(tmp_path, source):
    path = tmp_path / "m.kdc"
    meta = {"mean": (0.1307,), "metrics": {"val_accuracy": torch.tensor(0.75)}, "where": tmp_path}
    _save(path, source[0], metadata=meta)
    assert [p.name for p in tmp_path.iterdir()] == ["m.kdc"]  # written atomically, no leftovers
    raw = torch.load(path, weights_only=True)  # plain types only
    assert raw["format"] == "kdcli-model" and raw["format_version"] == 1
    assert raw["model"] == {"name": "cnn3", "args": {"widths": [4, 8, 8], "hidden": 16},
                            "input_shape": [1, 12, 12], "num_classes": 10}
    assert raw["metadata"] == {"mean": [0.1307], "metrics": {"val_accuracy": 0.75}, "where": str(tmp_path)}
    model, info = load_model_file(path)
    _assert_same(model, source)
    assert info["model"]["name"] == "cnn3" and info["pruning_history"] == [] and info["metadata"]["mean"] == [0.1307]


def test_is_model_file(tmp_path, source):
    _save(tmp_path / "m.kdc", source[0])
    _save(tmp_path / "m.pt", source[0])  # recognised by content
    torch.save(_sd(source), tmp_path / "plain.pt")
    (tmp_path / "text.txt").write_text("kdcli-model")
    assert is_model_file(tmp_path / "m.kdc") and is_model_file(tmp_path / "m.pt")
    assert not is_model_file(tmp_path / "plain.pt") and not is_model_file(tmp_path / "text.txt")
    assert not is_model_file(tmp_path / "missing.kdc")


def test_wrong_format_or_version(tmp_path, source):
    torch.save({"format": "something-else", "state_dict": _sd(source)}, tmp_path / "a.kdc")
    with pytest.raises(CheckpointError, match=r"a\.kdc: not a kdcli model file"):
        load_model_file(tmp_path / "a.kdc")
    _save(tmp_path / "b.kdc", source[0])
    obj = torch.load(tmp_path / "b.kdc", weights_only=True)
    obj["format_version"] = 2
    torch.save(obj, tmp_path / "b.kdc")
    with pytest.raises(CheckpointError, match="kdcli model format version 2; this kdcli reads version 1"):
        load_model_file(tmp_path / "b.kdc")


def test_model_file_with_pruned_weights_but_no_history_is_refused(tmp_path, source):
    from kdcli.prune.pruner import StructuredPruner

    model = build_model(SPEC[0], SPEC[1], input_shape=SHAPE, num_classes=10).eval()
    p = StructuredPruner(model, torch.zeros(1, *SHAPE))
    p.apply({"conv2.0": [0, 1]})
    _save(tmp_path / "lost.kdc", model)  # history forgotten: the weights no longer fit the spec
    with pytest.raises(CheckpointError, match="does not fit model cnn3 after its pruning history: shape of conv2.0.weight"):
        load_model_file(tmp_path / "lost.kdc")
    _save(tmp_path / "ok.kdc", model, pruning_history=p.history())
    loaded, _ = load_model_file(tmp_path / "ok.kdc")
    assert loaded.conv2[0].out_channels == 6
    _save(tmp_path / "bad.kdc", model, pruning_history=[["conv7", True, [0]]])
    with pytest.raises(CheckpointError, match="no module 'conv7'"):
        load_model_file(tmp_path / "bad.kdc")


def test_unstorable_model_args_are_refused(tmp_path, source):
    with pytest.raises(ModelError, match=r"model.args.act: object cannot be stored"):
        save_model_file(tmp_path / "x.kdc", source[0], name="cnn3", args={"act": object()}, input_shape=SHAPE,
                        num_classes=10)

"""Streaming data (``data.loading``, ``data.workers``; kdcli.data.stream): an image folder and
``.npy`` shards read sample by sample by DataLoader workers give the in-memory path's batches,
augment reproducibly whatever the number of workers, and run a compression end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import kdcli.data.stream as S
from kdcli.config.data import DataSpec
from kdcli.data.loader import load_data, translate
from kdcli.errors import DataError


def make_folder(root: Path, n: int = 60, size=(12, 10)) -> Path:
    """``n`` noise images (PNG and JPEG, W x H = ``size``) in 3 class folders."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"class{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(a).save(d / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("images"))


def load(path: Path, seed: int = 3, **kw):
    kind = kw.pop("kind", "image-folder")
    spec = DataSpec.model_validate({"source": {"kind": kind, "path": str(path)}, "batch_size": 16, **kw})
    return load_data(spec, base_dir=path, seed=seed)


def batches(loader, epoch: int = 0):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone(), i.clone()) for x, y, i in loader]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(p, q) for u, v in zip(a, b) for p, q in zip(u, v))


# ----------------------------------------------------------------------------- equivalence


def test_memory_and_stream_give_the_same_batches_without_augmentation(folder):
    mem = load(folder, loading="memory", input={"size": [8, 8]})  # resized by data.input: the same function
    st = load(folder, loading="stream", workers=0, input={"size": [8, 8]})
    assert not mem.streamed and st.streamed and type(st.train).__name__ == "StreamData"
    assert (mem.mean, mem.std, mem.input_shape, mem.splits) == (st.mean, st.std, st.input_shape, st.splits)
    assert "loading: in memory (data.loading: memory)" in mem.judged_by()
    assert "loading: streamed from disk in the training process (data.loading: stream, data.workers: 0)" in st.judged_by()
    for epoch in (0, 1):  # same seeded order, same pixels, same labels and indices
        assert same(batches(mem.loader("train", train=True, seed=5), epoch),
                    batches(st.loader("train", train=True, seed=5), epoch))
    for rank in (0, 1):  # sharded like DistributedSampler
        assert same(batches(mem.loader("train", train=True, seed=5, rank=rank, world_size=2)),
                    batches(st.loader("train", train=True, seed=5, rank=rank, world_size=2)))
    assert same(batches(mem.loader("val", train=False)), batches(st.loader("val", train=False)))
    xm, ym = mem.eval_tensors("val", limit=5)
    xs, ys = st.eval_tensors("val", limit=5)
    assert xs.shape == (5, 3, 8, 8) and torch.equal(xm, xs) and torch.equal(ym, ys)
    assert len(st.loader("train", train=True)) == len(mem.loader("train", train=True)) == 4  # 54 / 16


def test_tensor_shards_memory_and_stream(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 2, 4, 4))  # float64: both paths read float32
    y = np.arange(30) % 3
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    for k, (a, b) in enumerate(((0, 13), (13, 30))):
        np.save(tmp_path / "train" / f"x_{k}.npy", x[a:b])
        np.save(tmp_path / "train" / f"y_{k}.npy", y[a:b])
    np.save(tmp_path / "test" / "x_0.npy", x[:6])
    np.save(tmp_path / "test" / "y_0.npy", y[:6])
    mem = load(tmp_path, kind="tensor-shards", loading="memory")
    st = load(tmp_path, kind="tensor-shards", loading="stream", workers=0)
    assert st.streamed and st.train.dtype == torch.float32 and st.input_shape == (2, 4, 4) and len(st.test) == 6
    assert same(batches(mem.loader("train", train=True, seed=1)), batches(st.loader("train", train=True, seed=1)))
    assert torch.allclose(torch.tensor(mem.mean), torch.tensor(st.mean))
    # .npz shards are read into memory only
    (tmp_path / "z").mkdir()
    for k in range(2):
        np.savez(tmp_path / "z" / f"s{k}.npz", x=x[k::2], y=y[k::2])
    z = load(tmp_path / "z", kind="tensor-shards")
    assert len(z.train) + len(z.val) == 30 and not z.streamed and ".npz shards cannot stream" in z.judged_by()
    with pytest.raises(DataError, match=r"^data\.loading: stream memory-maps x_\*\.npy"):
        load(tmp_path / "z", kind="tensor-shards", loading="stream")
    # a NaN row is found on the worker and reported in one line, as the in-memory check does
    bad = x[13:].copy()
    bad[4, 0, 0, 0] = np.nan
    np.save(tmp_path / "train" / "x_1.npy", bad)
    st = load(tmp_path, kind="tensor-shards", loading="stream", workers=1, normalize="none")
    with pytest.raises(DataError) as info:
        batches(st.loader("train", train=False))
    assert str(info.value) == f"tensor-shards {tmp_path}: training sample 17 has NaN or infinite inputs; " \
                              "clean the data (this is not a training problem)"


# ----------------------------------------------------------------------------- augmentation


def test_shift_is_the_batch_translation():
    x = torch.arange(2 * 5 * 6, dtype=torch.float32).reshape(2, 5, 6)
    for dy, dx in ((0, 0), (2, -1), (-3, 4), (5, 0), (-1, -6)):
        want = translate(x[None], torch.tensor([dy]), torch.tensor([dx]))[0] if max(abs(dy), abs(dx)) < 5 \
            else torch.zeros_like(x)
        assert torch.equal(S.shift(x, dy, dx), want), (dy, dx)


def test_stream_augmentation_is_seeded_and_independent_of_workers(folder):
    aug = {"crop_padding": 2, "hflip": True}
    d0 = load(folder, loading="stream", workers=0, augment=aug, normalize="none")
    d2 = load(folder, loading="stream", workers=2, augment=aug, normalize="none")
    l0, l2 = d0.loader("train", train=True, seed=7), d2.loader("train", train=True, seed=7)
    assert l0.augmented and l2.augmented and not d0.loader("train", train=False).augmented
    for epoch in (0, 1):
        assert same(batches(l0, epoch), batches(l2, epoch))  # workers 0 and 2: the same batches
    plain = batches(load(folder, loading="stream", workers=0, normalize="none").loader("train", train=True, seed=7))
    e0, e1 = batches(l0, 0), batches(l0, 1)
    assert same(e0, batches(d0.loader("train", train=True, seed=7)))  # a fresh loader: the same draws
    assert torch.equal(e0[0][2], plain[0][2]) and not torch.equal(e0[0][0], plain[0][0])  # same order, moved pixels
    assert not torch.equal(e0[0][0], e1[0][0])  # another epoch: other draws
    l2.close()


# ----------------------------------------------------------------------------- choosing, errors


def test_auto_chooses_by_the_share_of_available_memory(folder, monkeypatch):
    monkeypatch.setattr(S, "available_memory", lambda: 64 << 30)
    d = load(folder, workers=2)
    assert not d.streamed and "loading: in memory (data.loading: auto, 21.6 KB decoded is within 25% of the " \
                              "68.7 GB available)" in d.judged_by()
    monkeypatch.setattr(S, "available_memory", lambda: 80_000)  # 25 % of it: 20 KB, under the set's 21.6 KB
    d = load(folder, workers=2)
    assert d.streamed and d.workers == 2
    assert "loading: streamed from disk by 2 worker processes (data.loading: auto, 21.6 KB decoded is over 25%" \
           in d.judged_by()
    monkeypatch.setattr(S, "RAM_SHARE", 0.5)  # the share is a module constant: 40 KB holds the set
    assert not load(folder).streamed
    monkeypatch.setattr(S, "available_memory", lambda: None)
    assert not load(folder).streamed and "available memory unknown" in load(folder).judged_by()
    assert S.resolve_workers("auto") == S.default_workers() and 1 <= S.default_workers() <= 4


def test_a_streamed_split_is_not_materialised_by_accident(folder, monkeypatch):
    d = load(folder, loading="stream", workers=0)
    with pytest.raises(DataError, match=r"^data\.loading: image-folder .* is streamed from disk"):
        d.train.x
    monkeypatch.setattr(S, "available_memory", lambda: 10_000)
    import kdcli.data.loader as L
    monkeypatch.setattr(L, "available_memory", lambda: 10_000)
    with pytest.raises(DataError, match=r"^data\.limit_eval: the val split is 6 streamed samples; .* at most 1$"):
        d.eval_tensors("val")
    assert d.eval_tensors("val", limit=1)[0].shape == (1, 3, 10, 12)
    assert sum(len(y) for _, y, _ in d.eval_batches("val")) == 6  # batch by batch: no cap


def test_undecodable_image_on_a_worker_is_one_line(tmp_path):
    make_folder(tmp_path, n=6)
    (tmp_path / "class1" / "004.jpg").write_bytes(b"not a jpeg")
    d = load(tmp_path, loading="stream", workers=1, normalize="none")
    with pytest.raises(DataError) as info:
        batches(d.loader("train", train=False))
    assert str(info.value) == f"{tmp_path / 'class1' / '004.jpg'}: cannot decode image (UnidentifiedImageError)"


def invoke(*args):
    from kdcli.cli import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    return res, [ln for ln in res.output.splitlines() if ln.startswith("error:")]


RECIPE = """seed: 0
device: cpu
data:
  source: {{kind: image-folder, path: {path}}}
  input: {{size: [8, 8]}}
  val_fraction: 0.2
  batch_size: 16
{extra}
teacher: {{model: mlp, model_args: {{hidden: [16]}}, train: {{epochs: 1, lr: 0.05}}}}
student: {{from: pruned-teacher}}
distill: {{train: {{epochs: 1, lr: 0.02}}}}
prune: {{steps: 1, final_epochs: 1}}
target: {{macs: 0.6, max_accuracy_drop: 1.0}}
"""


@pytest.mark.parametrize("extra, message", [
    ("  workers: -1", r"data\.workers: expected auto or a number of worker processes in \[0, 256\] \(got -1\)"),
    ("  workers: '999'", r"data\.workers: expected auto or a number of worker processes in \[0, 256\] \(got 999\)"),
    ("  loading: foo", r"data\.loading: Input should be 'auto', 'memory' or 'stream' \(got 'foo'\)"),
])
def test_config_errors_name_the_field(tmp_path, extra, message):
    import re

    (tmp_path / "r.yaml").write_text(RECIPE.format(path=tmp_path, extra=extra))
    res, errors = invoke("compress", tmp_path / "r.yaml", "--out", tmp_path / "run")
    assert res.exit_code == 2 and len(errors) == 1 and re.search(message, errors[0]), res.output


def test_stream_refuses_a_source_that_cannot_stream(tmp_path):
    from kdcli.config.recipe import parse_recipe
    from kdcli.errors import RecipeError

    with pytest.raises(RecipeError, match=r"^r\.yaml:3: data\.loading: stream reads only image-folder and "
                                          r"tensor-shards sources, not digits"):
        parse_recipe("teacher: {model: mlp}\ndata:\n  loading: stream\n", "r.yaml")


def test_compress_streams_an_image_folder_end_to_end(folder, tmp_path):
    (tmp_path / "r.yaml").write_text(RECIPE.format(path=folder, extra="  loading: stream\n  workers: 1"))
    res, errors = invoke("compress", tmp_path / "r.yaml", "--out", tmp_path / "run", "--no-export", "--threads", "1")
    assert res.exit_code == 0 and not errors, res.output
    assert "loading: streamed from disk by 1 worker process (data.loading: stream)" in res.output
    assert (tmp_path / "run" / "student.kdc").is_file()

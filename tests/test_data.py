"""Data sources (each reader on tiny files written here, and on ../shared/data), load_data's
splits, limits and normalisation, and BatchLoader's augmentation and sharding."""

from __future__ import annotations

import argparse
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcli.data.loader import AugmentSpec, BatchLoader, DataSpec, TensorData, load_data
from kdcli.data.sources import read_idx_file, read_source
from kdcli.errors import DataError


def source(**kw):
    """A validated source spec, as a recipe's ``data.source`` would give it."""
    return DataSpec(source=kw).source_spec


# ----------------------------------------------------------------------------- digits


def test_digits_last_360_are_the_test_split():
    from sklearn.datasets import load_digits

    train, test, names, what = read_source(DataSpec().source_spec, Path("."))
    assert what == "digits" and names == [str(i) for i in range(10)]
    assert train.x.shape == (1437, 1, 8, 8) and test.x.shape == (360, 1, 8, 8)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert float(train.x.min()) == 0.0 and float(train.x.max()) == 1.0  # 0..16 divided by 16
    ref = load_digits()
    assert torch.equal(test.y, torch.from_numpy(ref.target[-360:]).long())
    assert torch.allclose(test.x[5, 0] * 16, torch.from_numpy(ref.images[-355]).float())


# ----------------------------------------------------------------------------- IDX


def write_idx(path: Path, arr: np.ndarray, magic: int | None = None, gz: bool = False, cut: int = 0) -> Path:
    """Write ``arr`` (uint8) as an IDX file: big-endian magic, dims, then the bytes."""
    magic = magic if magic is not None else (2051 if arr.ndim == 3 else 2049)
    raw = struct.pack(">i", magic) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.astype(np.uint8).tobytes()
    raw = raw[: len(raw) - cut]
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def write_mnist(folder: Path, n_train=5, n_test=2, gz=False, rows=3, cols=4) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    x = (np.arange(n_train * rows * cols) % 251).astype(np.uint8).reshape(n_train, rows, cols)
    y = np.arange(n_train) % 10
    write_idx(folder / "train-images-idx3-ubyte", x, gz=gz)
    write_idx(folder / "train-labels-idx1-ubyte", y, gz=gz)
    if n_test:
        write_idx(folder / "t10k-images-idx3-ubyte", 255 - x[:n_test], gz=gz)
        write_idx(folder / "t10k-labels-idx1-ubyte", y[:n_test][::-1].copy(), gz=gz)
    return x, y


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reads_images_and_labels(tmp_path, gz):
    x, y = write_mnist(tmp_path, gz=gz)
    train, test, names, what = read_source(source(kind="idx", path=str(tmp_path)), Path("/"))
    assert train.x.dtype == torch.uint8 and train.x.shape == (5, 1, 3, 4)  # rows before cols
    assert torch.equal(train.x[:, 0], torch.from_numpy(x))
    assert train.y.tolist() == [0, 1, 2, 3, 4] and train.y.dtype == torch.int64
    assert test.x.shape == (2, 1, 3, 4) and int(test.x[0, 0, 0, 0]) == 255 and test.y.tolist() == [1, 0]
    assert names == [] and str(tmp_path) in what


def test_idx_relative_path_classes_and_no_test(tmp_path):
    write_mnist(tmp_path / "mn", n_test=0)
    train, test, names, _ = read_source(source(kind="idx", path="mn", classes=list("abcde")), tmp_path)
    assert len(train) == 5 and test is None and names == list("abcde")


def test_idx_errors(tmp_path):
    x, y = write_mnist(tmp_path)
    img = tmp_path / "train-images-idx3-ubyte"
    write_idx(img, x, cut=1)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: 75 bytes, expected 76 for an IDX array of shape \[5, 3, 4\] \(truncated\)"):
        read_idx_file(img, 2051)
    write_idx(img, x, magic=2049)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: IDX magic 2049, expected 2051"):
        read_source(source(kind="idx", path=str(tmp_path)), tmp_path)
    write_idx(img, x)
    write_idx(tmp_path / "train-labels-idx1-ubyte", y[:4])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: 4 labels, expected 5"):
        read_source(source(kind="idx", path=str(tmp_path)), tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"no train-labels-idx1-ubyte"):
        read_source(source(kind="idx", path=str(tmp_path)), tmp_path)
    with pytest.raises(DataError, match=r"data.source.path: idx directory .*nowhere not found"):
        read_source(source(kind="idx", path="nowhere"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"has no train-images-idx3-ubyte"):
        read_source(source(kind="idx", path="empty"), tmp_path)


def test_idx_truncated_gzip_is_a_data_error(tmp_path):
    x, _ = write_mnist(tmp_path, gz=True)
    gz = tmp_path / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:-12])  # cut into the deflate stream / trailer
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: cannot read"):
        read_idx_file(gz, 2051)


# ----------------------------------------------------------------------------- CIFAR-10 binary


def cifar_records(labels) -> bytes:
    """Records whose R/G/B planes are (k + position) % 256 for k = 0/100/200, plus the label."""
    pos = np.arange(1024)
    planes = np.concatenate([(pos + k) % 256 for k in (0, 100, 200)]).astype(np.uint8)
    return b"".join(bytes([lab]) + planes.tobytes() for lab in labels)


def test_cifar10_bin_planes_order_and_splits(tmp_path):
    (tmp_path / "data_batch_10.bin").write_bytes(cifar_records([9]))
    (tmp_path / "data_batch_2.bin").write_bytes(cifar_records([3, 7]))
    (tmp_path / "test_batch.bin").write_bytes(cifar_records([1]))
    train, test, names, _ = read_source(source(kind="cifar10-bin", path=str(tmp_path)), tmp_path)
    assert train.x.shape == (3, 3, 32, 32) and train.x.dtype == torch.uint8
    assert train.y.tolist() == [3, 7, 9]  # batch 2 before batch 10 (natural order)
    # pixel (row 1, col 2) is position 34 of each plane; the planes are R, G, B
    assert train.x[0, :, 1, 2].tolist() == [34, 134, 234 % 256]
    assert test.y.tolist() == [1] and names[0] == "airplane" and names[9] == "truck"


def test_cifar10_bin_errors(tmp_path):
    with pytest.raises(DataError, match="has no data_batch_"):
        read_source(source(kind="cifar10-bin", path=str(tmp_path)), tmp_path)
    (tmp_path / "data_batch_1.bin").write_bytes(cifar_records([1, 2])[:-1])
    with pytest.raises(DataError, match=r"data_batch_1.bin: 6145 bytes is not a whole number of 3073-byte"):
        read_source(source(kind="cifar10-bin", path=str(tmp_path)), tmp_path)


# ----------------------------------------------------------------------------- image folder


def write_png(path: Path, rgb, size=(4, 3), mode="RGB"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, rgb).save(path)  # size is (W, H) in PIL


def test_image_folder_flat_layout(tmp_path):
    write_png(tmp_path / "dog" / "a.png", (10, 20, 30))
    write_png(tmp_path / "cat" / "b.png", (200, 100, 0))
    write_png(tmp_path / "cat" / "a.PNG", (1, 2, 3))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    train, test, names, _ = read_source(source(kind="image-folder", path=str(tmp_path)), tmp_path)
    assert names == ["cat", "dog"] and test is None
    assert train.x.shape == (3, 3, 3, 4) and train.x.dtype == torch.uint8  # [N, C, H, W]
    assert train.y.tolist() == [0, 0, 1]
    assert train.x[0, :, 2, 3].tolist() == [1, 2, 3] and train.x[2, :, 0, 0].tolist() == [10, 20, 30]


def test_image_folder_train_test_grayscale_resize(tmp_path):
    write_png(tmp_path / "train" / "a" / "1.png", (255, 255, 255), size=(6, 2))
    write_png(tmp_path / "train" / "b" / "1.png", (0, 0, 0), size=(6, 2))
    write_png(tmp_path / "test" / "b" / "1.png", (0, 0, 0), size=(8, 8))
    spec = source(kind="image-folder", path=str(tmp_path), grayscale=True, size=[5, 7])
    train, test, names, _ = read_source(spec, tmp_path)
    assert names == ["a", "b"] and train.x.shape == (2, 1, 5, 7) and test.x.shape == (1, 1, 5, 7)
    assert int(train.x[0].min()) == 255 and test.y.tolist() == [1]


def test_image_folder_errors(tmp_path):
    write_png(tmp_path / "a" / "1.png", (0, 0, 0), size=(4, 4))
    write_png(tmp_path / "a" / "2.png", (0, 0, 0), size=(5, 4))
    with pytest.raises(DataError, match=r"a/2.png: image is 5x4, but 1.png is 4x4; set data.source.size"):
        read_source(source(kind="image-folder", path=str(tmp_path)), tmp_path)
    (tmp_path / "a" / "2.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"2.png: cannot decode image"):
        read_source(source(kind="image-folder", path=str(tmp_path)), tmp_path)
    write_png(tmp_path / "s" / "train" / "a" / "1.png", (0, 0, 0))
    write_png(tmp_path / "s" / "test" / "zebra" / "1.png", (0, 0, 0))
    with pytest.raises(DataError, match=r"class folder 'zebra' is not one of the training classes"):
        read_source(source(kind="image-folder", path="s"), tmp_path)
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="has no class sub-folders"):
        read_source(source(kind="image-folder", path="none"), tmp_path)


# ----------------------------------------------------------------------------- tensor files


def test_tensors_pt_and_npz(tmp_path):
    x = torch.arange(24, dtype=torch.float64).reshape(6, 4)
    torch.save({"x": x, "y": torch.tensor([0, 1, 2, 0, 1, 2]), "x_test": x[:2], "y_test": torch.tensor([[2], [1]])},
               tmp_path / "d.pt")
    train, test, names, _ = read_source(source(kind="tensors", path="d.pt"), tmp_path)
    assert train.x.dtype == torch.float32 and train.x.shape == (6, 4) and float(train.x[5, 3]) == 23.0
    assert train.y.dtype == torch.int64 and test.y.tolist() == [2, 1] and names == []

    imgs = np.full((3, 5, 5), 7, dtype=np.uint8)  # [N, H, W]: gains a channel axis
    np.savez(tmp_path / "d.npz", images=imgs, labels=np.array([1, 0, 1], dtype=np.int32),
             test_images=imgs[:1], test_labels=np.array([0]), classes=np.array(["no", "yes"]))
    train, test, names, _ = read_source(source(kind="tensors", path="d.npz"), tmp_path)
    assert train.x.dtype == torch.uint8 and train.x.shape == (3, 1, 5, 5) and len(test) == 1
    assert names == ["no", "yes"] and train.y.tolist() == [1, 0, 1]


def test_tensors_errors(tmp_path):
    torch.save({"x": torch.zeros(4, 2), "y": torch.zeros(3, dtype=torch.long)}, tmp_path / "a.pt")
    with pytest.raises(DataError, match=r"a.pt\['y'\]: labels of shape \[3\], expected \[4\]"):
        read_source(source(kind="tensors", path="a.pt"), tmp_path)
    torch.save({"inputs": torch.zeros(4, 2)}, tmp_path / "b.pt")
    with pytest.raises(DataError, match=r"no x/y, inputs/labels or images/labels entries \(found \['inputs'\]\)"):
        read_source(source(kind="tensors", path="b.pt"), tmp_path)
    torch.save(torch.zeros(3), tmp_path / "c.pt")
    with pytest.raises(DataError, match="holds a Tensor, expected a mapping"):
        read_source(source(kind="tensors", path="c.pt"), tmp_path)
    torch.save({"x": torch.zeros(2, 2), "y": torch.zeros(2), "meta": argparse.Namespace(a=1)}, tmp_path / "d.pt")
    with pytest.raises(DataError, match=r"d.pt: cannot read tensors"):  # weights_only refuses objects
        read_source(source(kind="tensors", path="d.pt"), tmp_path)
    np.savez(tmp_path / "e.npz", x=np.zeros((2, 3)), y=np.array([0.5, 1.0]))
    with pytest.raises(DataError, match="fractional"):
        read_source(source(kind="tensors", path="e.npz"), tmp_path)
    np.savez(tmp_path / "f.npz", x=np.zeros((2, 3)), y=np.array([0, 1]), x_test=np.zeros((1, 4)), y_test=[0])
    with pytest.raises(DataError, match=r"test inputs of shape \[4\], expected \[3\]"):
        read_source(source(kind="tensors", path="f.npz"), tmp_path)
    (tmp_path / "g.csv").write_text("1,2\n")
    with pytest.raises(DataError, match="expected a .pt or .npz file"):
        read_source(source(kind="tensors", path="g.csv"), tmp_path)
    with pytest.raises(DataError, match="tensor file .*missing.pt not found"):
        read_source(source(kind="tensors", path="missing.pt"), tmp_path)


# ----------------------------------------------------------------------------- python factories

FACTORY = '''
import numpy as np
import torch
from torch.utils.data import TensorDataset


class Pairs:
    classes = ["even", "odd"]

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.full((2, 3), i, dtype=np.uint8), i % 2


def pairs(n=4):
    return Pairs(n)


def split():
    return TensorDataset(torch.ones(5, 3), torch.arange(5)), TensorDataset(torch.zeros(2, 3), torch.tensor([0, 4]))


def bad_items():
    return [(torch.zeros(3), 0.5)]


def ragged():
    return [(torch.zeros(3), 0), (torch.zeros(4), 1)]


def broken():
    raise RuntimeError("no network")


def pil():  # torchvision data sets without a transform return PIL images
    from PIL import Image
    return [(Image.new("RGB", (4, 3), (1, 2, 3)), 1), (Image.new("L", (4, 3), 9).convert("RGB"), 0)]
'''


def test_python_factory_file(tmp_path):
    (tmp_path / "mydata.py").write_text(FACTORY)
    train, test, names, what = read_source(source(kind="python", factory="mydata.py:pairs", args={"n": 3}), tmp_path)
    assert train.x.shape == (3, 2, 3) and train.x.dtype == torch.uint8 and int(train.x[2, 1, 2]) == 2
    assert train.y.tolist() == [0, 1, 0] and test is None and names == ["even", "odd"]
    assert what == "python mydata.py:pairs"
    train, test, _, _ = read_source(source(kind="python", factory="mydata.py:split"), tmp_path)
    assert train.x.dtype == torch.float32 and len(train) == 5 and test.y.tolist() == [0, 4]
    train, _, _, _ = read_source(source(kind="python", factory="mydata.py:pil"), tmp_path)
    assert train.x.shape == (2, 3, 3, 4) and train.x[0, :, 2, 3].tolist() == [1, 2, 3]
    assert train.x.dtype == torch.uint8 and train.y.tolist() == [1, 0]


def test_python_factory_module_on_sys_path(tmp_path, monkeypatch):
    (tmp_path / "kdcli_test_datamod.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    train, _, _, _ = read_source(source(kind="python", factory="kdcli_test_datamod:pairs"), Path("/"))
    assert len(train) == 4


@pytest.mark.parametrize("factory, message", [
    ("mydata.py:bad_items", r"item 0 is tuple, expected \(input, integer label\)"),
    ("mydata.py:ragged", r"item 1 input has shape \[4\], item 0 \[3\]"),
    ("mydata.py:broken", r"calling it with args \{\} failed: RuntimeError: no network"),
    ("mydata.py:nothing", r"has no callable 'nothing'"),
    ("other.py:pairs", r"data.source.factory 'other.py:pairs': file .*other.py not found"),
    ("no_such_module_kd:fn", r"cannot import module 'no_such_module_kd'"),
])
def test_python_factory_errors(tmp_path, factory, message):
    (tmp_path / "mydata.py").write_text(FACTORY)
    with pytest.raises(DataError, match=message):
        read_source(source(kind="python", factory=factory), tmp_path)


# ----------------------------------------------------------------------------- load_data


def write_indexed(tmp_path: Path, n=50, channels=2) -> dict:
    """A tensor file whose sample i has every value equal to i, so inputs identify samples."""
    x = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, channels, 2, 2).clone()
    torch.save({"x": x, "y": torch.arange(n) % 3}, tmp_path / "idx.pt")
    return {"kind": "tensors", "path": "idx.pt"}


def test_split_is_seeded_disjoint_and_complete(tmp_path):
    spec = DataSpec(source=write_indexed(tmp_path), val_fraction=0.2, normalize="none")
    a, b = load_data(spec, base_dir=tmp_path, seed=1), load_data(spec, base_dir=tmp_path, seed=1)
    c = load_data(spec, base_dir=tmp_path, seed=2)
    ids = lambda d: d.x[:, 0, 0, 0].long().tolist()  # noqa: E731
    assert len(a.val) == 10 and len(a.train) == 40 and a.test is None
    assert ids(a.val) == ids(b.val) and ids(a.val) != ids(c.val)
    assert sorted(ids(a.train) + ids(a.val)) == list(range(50))
    assert a.num_classes == 3 and a.input_shape == (2, 2, 2) and a.class_names == ["0", "1", "2"]
    assert a.description.startswith("tensors ") and "40 train, 10 val, no test" in a.description


def test_limits_and_label_range(tmp_path):
    spec = DataSpec(source=write_indexed(tmp_path), val_fraction=0.2, limit_train=7, limit_eval=3)
    d = load_data(spec, base_dir=tmp_path, seed=0)
    assert len(d.train) == 7 and len(d.val) == 3
    bad = DataSpec(source={**write_indexed(tmp_path), "classes": ["a", "b"]})
    with pytest.raises(DataError, match=r"train label 2 out of range, expected \[0, 1\]"):
        load_data(bad, base_dir=tmp_path, seed=0)


def test_auto_normalisation_standardises_train(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(200, 3, 4, 4, generator=g) * torch.tensor([50.0, 120.0, 250.0])[:, None, None]).to(torch.uint8)
    torch.save({"x": x, "y": torch.zeros(200, dtype=torch.long)}, tmp_path / "u8.pt")
    d = load_data(DataSpec(source={"kind": "tensors", "path": "u8.pt"}, val_fraction=0.1), base_dir=tmp_path, seed=0)
    assert d.scale == pytest.approx(1 / 255) and d.mean[0] == pytest.approx(25 / 255, abs=0.02)
    xn, _ = d.eval_tensors("train")
    assert xn.shape == (180, 3, 4, 4)
    assert torch.allclose(xn.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(xn.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-3)


def test_fixed_normalisation(tmp_path):
    spec = DataSpec(source=write_indexed(tmp_path, n=4), val_fraction=0, normalize={"mean": [1.0], "std": [2.0]})
    d = load_data(spec, base_dir=tmp_path, seed=0)
    assert d.mean == [1.0, 1.0] and d.std == [2.0, 2.0]  # one value broadcast to both channels
    xn, y = d.eval_tensors("train")
    assert xn[:, 0, 0, 0].tolist() == [-0.5, 0.0, 0.5, 1.0]  # (i - 1) / 2 in the split's order
    with pytest.raises(DataError, match="3 mean/std values, but .* has 2 channels"):
        load_data(DataSpec(source=spec.source, normalize={"mean": [0, 0, 0], "std": [1, 1, 1]}),
                  base_dir=tmp_path, seed=0)


# ----------------------------------------------------------------------------- BatchLoader


def spot_images(n=64, size=9, at=(4, 2)) -> TensorData:
    """``n`` black 1-channel images with one bright pixel at ``at``."""
    x = torch.zeros(n, 1, size, size)
    x[:, 0, at[0], at[1]] = 1.0
    return TensorData(x, torch.zeros(n, dtype=torch.long))


def bright_positions(loader) -> list[tuple[int, int] | None]:
    out = []
    for x, _, _ in loader:
        for img in x[:, 0]:
            hit = (img > 0.5).nonzero().tolist()
            assert len(hit) <= 1
            out.append(tuple(hit[0]) if hit else None)
    return out


@pytest.mark.parametrize("kind", ["crop_padding", "jitter"])
def test_translation_moves_content_at_most_p_pixels(kind):
    data = spot_images()
    aug = AugmentSpec(**{kind: 2})
    loader = BatchLoader(data, batch_size=16, train=True, mean=[0.0], std=[1.0], scale=1.0, augment=aug, seed=3)
    pos = bright_positions(loader)
    assert all(p is not None and abs(p[0] - 4) <= 2 and abs(p[1] - 2) <= 2 for p in pos)
    assert len(set(pos)) > 5  # 64 draws from 25 offsets: the content really moves
    x, _, _ = next(iter(loader))
    assert x.shape == (16, 1, 9, 9)


def test_hflip_mirrors_about_half_the_images():
    loader = BatchLoader(spot_images(), batch_size=64, train=True, mean=[0.0], std=[1.0], scale=1.0,
                         augment=AugmentSpec(hflip=True), seed=0)
    pos = bright_positions(loader)
    assert set(pos) == {(4, 2), (4, 6)}  # column 2 mirrors to 9 - 1 - 2
    assert 16 <= pos.count((4, 6)) <= 48


def test_eval_loader_does_not_augment():
    loader = BatchLoader(spot_images(8), batch_size=8, train=False, mean=[0.0], std=[1.0], scale=1.0,
                         augment=AugmentSpec(crop_padding=3, hflip=True))
    assert bright_positions(loader) == [(4, 2)] * 8


def test_shards_cover_the_permutation():
    data = TensorData(torch.zeros(7, 2), torch.zeros(7, dtype=torch.long))
    kw = dict(batch_size=3, train=True, mean=[0.0, 0.0], std=[1.0, 1.0], scale=1.0, seed=5, world_size=2)
    shards = [torch.cat([i for _, _, i in BatchLoader(data, rank=r, **kw)]).tolist() for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 4  # ceil(7 / 2), padded by wrapping around
    assert set(shards[0]) | set(shards[1]) == set(range(7))
    assert len(BatchLoader(data, rank=0, **kw)) == 2
    loader = BatchLoader(data, rank=0, **kw)
    first = torch.cat([i for _, _, i in loader]).tolist()
    loader.set_epoch(1)
    assert first == shards[0] and torch.cat([i for _, _, i in loader]).tolist() != first
    evals = [torch.cat([i for _, _, i in BatchLoader(data, rank=r, **{**kw, "train": False})]).tolist()
             for r in (0, 1)]
    assert sorted(evals[0] + evals[1]) == list(range(7))  # evaluation counts each sample once


# ----------------------------------------------------------------------------- real data sets


@pytest.mark.parametrize("name, first_labels", [("mnist", [5, 0, 4, 1, 9]), ("fashion_mnist", [9, 0, 0, 3, 0])])
def test_real_idx(shared_data, name, first_labels):
    train, test, _, _ = read_source(source(kind="idx", path=name), shared_data)
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert train.y[:5].tolist() == first_labels
    assert torch.equal(torch.unique(train.y), torch.arange(10)) and int(test.y.max()) == 9


def test_real_cifar10(shared_data):
    train, test, names, _ = read_source(source(kind="cifar10-bin", path="cifar10"), shared_data)
    assert train.x.shape == (50000, 3, 32, 32) and test.x.shape == (1000, 3, 32, 32)
    assert train.y[:5].tolist() == [6, 9, 9, 4, 1] and test.y[:5].tolist() == [3, 8, 8, 0, 6]
    assert torch.bincount(train.y).tolist() == [5000] * 10 and names[6] == "frog"


def test_real_mnist_bundle(shared_data):
    spec = DataSpec(source={"kind": "idx", "path": "mnist"}, val_fraction=0.1)
    d = load_data(spec, base_dir=shared_data, seed=0)
    assert (len(d.train), len(d.val), len(d.test)) == (54000, 6000, 10000)
    assert d.mean[0] == pytest.approx(0.1307, abs=0.002) and d.std[0] == pytest.approx(0.3081, abs=0.002)


def test_shipped_fashion_recipe_loads_its_data(shared_data):
    from kdcli.config.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "fashion-mnist.yaml")
    if not recipe.resolve(recipe.data.source_spec.path).is_dir():
        pytest.skip("the recipe's data path does not point at ../shared/data here")
    d = load_data(recipe.data, base_dir=recipe.base_dir, seed=recipe.seed)
    assert (len(d.train), len(d.val), len(d.test)) == (60000 - 4998, 4998, 10000)  # round(60000 * 0.0833)
    assert d.class_names[9] == "Ankle boot" and d.augment.hflip
    x, y, _ = next(iter(d.loader("train", train=True, batch_size=32)))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64

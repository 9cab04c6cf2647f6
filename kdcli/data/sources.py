"""Data source readers: each turns one ``data.source`` of a recipe into tensors in memory.

``read_source(spec, base_dir)`` returns ``(train, test, class_names, what)``: two
:class:`kdcli.data.loader.TensorData` splits (``test`` may be None), the class names (empty when the
source does not know them) and a short description for messages. Image files stay ``uint8``.
The image-folder and tensor-shards sources can also stream (:mod:`kdcli.data.stream`), which
lists them with :func:`image_folder_layout`/:func:`image_files` and :func:`shard_layout` and
decodes with :func:`decode_image`, the functions their in-memory readers use.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import torch

from kdcli.config.data import (Cifar10BinSource, DigitsSource, IdxSource, ImageFolderSource, PythonSource,
                               TensorShardsSource, TensorsSource)
from kdcli.data.tensors import TensorData
from kdcli.errors import DataError
from kdcli.models import import_callable

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}
_CIFAR_RECORD = 1 + 3 * 32 * 32  # one label byte, then the R, G and B planes of 32x32 pixels

Split = tuple[TensorData, "TensorData | None", list[str], str]


def read_source(spec, base_dir: Path) -> Split:
    """Read a source spec into ``(train, test, class_names, what)``.

    ``train``/``test`` hold ``x`` uint8 or float32 ``[N, C, H, W]`` (or ``[N, D]``) and ``y``
    int64 ``[N]``; ``test`` is None when the source has no test split; ``class_names`` may be
    empty (then classes are numbered); ``what`` names the source in messages.
    """
    reader = READERS.get(getattr(spec, "kind", None))
    if reader is None:
        raise DataError(f"data.source: unsupported source {type(spec).__name__}")
    return reader(spec, Path(base_dir))


READERS: dict[str, Callable] = {}  # source kind -> reader, filled by @reads


def reads(kind: str):
    """Register the decorated ``reader(spec, base_dir) -> Split`` for the source ``kind`` (its
    spec is the class of that kind in :mod:`kdcli.config.data`)."""
    def register(fn):
        READERS[kind] = fn
        return fn
    return register


def _resolve(p: str, base_dir: Path) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else base_dir / q


def _existing_dir(spec, base_dir: Path) -> Path:
    path = _resolve(spec.path, base_dir)
    if not path.is_dir():
        raise DataError(f"data.source.path: {spec.kind} directory {path} not found")
    return path


@reads("digits")
def _read_digits(spec: DigitsSource, base_dir: Path) -> Split:
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()  # bundled with scikit-learn: no download
    x = torch.from_numpy((d.images / 16.0).astype(np.float32)).unsqueeze(1)  # values 0..16 -> [0, 1]
    y = torch.from_numpy(d.target.astype(np.int64))
    cut = len(y) - 360
    return (TensorData(x[:cut], y[:cut]), TensorData(x[cut:], y[cut:]),
            [str(i) for i in range(10)], "digits")


# --- IDX (MNIST layout)

def read_idx_file(path: Path, magic: int):
    """Parse an IDX file of unsigned bytes (``.gz`` or not) into a numpy uint8 array.

    Header: big-endian int32 magic (2051 for ``[N, rows, cols]`` images, 2049 for ``[N]``
    labels), then one big-endian int32 per dimension (LeCun et al., the MNIST file format).
    """
    import gzip
    import zlib

    import numpy as np

    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None
    ndim = {2051: 3, 2049: 1}[magic]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header, expected {header} bytes, found {len(raw)}")
    head = np.frombuffer(raw, dtype=">i4", count=1 + ndim)
    if int(head[0]) != magic:
        raise DataError(f"{path}: IDX magic {int(head[0])}, expected {magic} "
                        f"({'images' if magic == 2051 else 'labels'} of unsigned bytes)")
    dims = [int(v) for v in head[1:]]
    need = header + math.prod(dims)
    if len(raw) != need:
        raise DataError(f"{path}: {len(raw)} bytes, expected {need} for an IDX array of shape {dims} "
                        f"({'truncated' if len(raw) < need else 'trailing bytes'})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _idx_file(folder: Path, prefix: str, kind: str) -> Path | None:
    # MNIST mirrors spell the name with '-' or '.' before 'idx' (train-images.idx3-ubyte)
    for sep in ("-", "."):
        for gz in ("", ".gz"):
            p = folder / f"{prefix}{sep}{kind}{gz}"
            if p.is_file():
                return p
    return None


def _read_idx_pair(folder: Path, prefix: str) -> TensorData | None:
    images = _idx_file(folder, f"{prefix}-images", "idx3-ubyte")
    labels = _idx_file(folder, f"{prefix}-labels", "idx1-ubyte")
    if images is None and labels is None:
        return None
    if images is None or labels is None:
        have, missing = (labels, "images") if images is None else (images, "labels")
        raise DataError(f"{folder}: found {have.name} but no {prefix}-{missing}-idx{'3' if missing == 'images' else '1'}-ubyte[.gz]")
    x, y = read_idx_file(images, 2051), read_idx_file(labels, 2049)
    if len(x) != len(y):
        raise DataError(f"{labels}: {len(y)} labels, expected {len(x)} (one per image in {images.name})")
    return TensorData(torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype("int64")))


@reads("idx")
def _read_idx(spec: IdxSource, base_dir: Path) -> Split:
    folder = _existing_dir(spec, base_dir)
    train = _read_idx_pair(folder, "train")
    if train is None:
        raise DataError(f"data.source.path: {folder} has no train-images-idx3-ubyte[.gz] / "
                        "train-labels-idx1-ubyte[.gz] (MNIST layout)")
    test = _read_idx_pair(folder, "t10k")
    return train, test, list(spec.classes or []), f"idx {folder}"


# --- CIFAR-10 binary version

def _natural_key(p: Path):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def read_cifar10_bin(files: list[Path]) -> TensorData:
    """Concatenate CIFAR-10 binary batches: records of 1 label byte + 3,072 pixel bytes (the
    1,024 R, G and B values of a 32x32 image, row-major; Krizhevsky 2009) -> uint8 [N, 3, 32, 32]."""
    import numpy as np

    parts = []
    for f in files:
        raw = f.read_bytes()
        if len(raw) == 0 or len(raw) % _CIFAR_RECORD:
            raise DataError(f"{f}: {len(raw)} bytes is not a whole number of {_CIFAR_RECORD}-byte CIFAR-10 records")
        parts.append(np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD))
    n = sum(len(r) for r in parts)
    x, y = np.empty((n, _CIFAR_RECORD - 1), dtype=np.uint8), np.empty(n, dtype=np.int64)
    i = 0
    for r in parts:  # one copy out of the read-only file buffers
        x[i:i + len(r)], y[i:i + len(r)] = r[:, 1:], r[:, 0]
        i += len(r)
    return TensorData(torch.from_numpy(x.reshape(n, 3, 32, 32)), torch.from_numpy(y))


@reads("cifar10-bin")
def _read_cifar10(spec: Cifar10BinSource, base_dir: Path) -> Split:
    folder = _existing_dir(spec, base_dir)
    train_files = sorted(folder.glob("data_batch_*.bin"), key=_natural_key)
    if not train_files:
        raise DataError(f"data.source.path: {folder} has no data_batch_*.bin files (the CIFAR-10 binary version)")
    test_files = sorted(folder.glob("test_batch*.bin"), key=_natural_key)
    test = read_cifar10_bin(test_files) if test_files else None
    return read_cifar10_bin(train_files), test, list(spec.classes or CIFAR10_CLASSES), f"cifar10-bin {folder}"


# --- image folder

def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_files(folder: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    """The image files of ``folder``'s class sub-folders (``<class>/<name>``, relative to
    ``folder``: strings, lighter than paths for a million files), sorted by class then name, and
    their labels (positions in ``classes``); a sub-folder not in ``classes`` is a DataError."""
    files, labels = [], []
    for d in _class_dirs(folder):
        if d.name not in classes:
            raise DataError(f"{d}: class folder {d.name!r} is not one of the training classes {classes}")
        with os.scandir(d) as it:  # scandir's entries carry the file type: no stat per file
            names = sorted(e.name for e in it if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES)
        files += [f"{d.name}/{n}" for n in names]
        labels += [classes.index(d.name)] * len(names)
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class folders")
    return files, labels


def decode_image(f: Path, grayscale: bool, size):
    """One image file as uint8 ``[H, W]`` (grey) or ``[H, W, 3]``, resized to ``size`` [H, W]
    (bilinear) when given. The in-memory reader and the streaming one both decode with this."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(f) as im:
            im = im.convert("L" if grayscale else "RGB")
            if size is not None:
                im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)  # PIL: (W, H)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"{f}: cannot decode image ({type(exc).__name__})") from None


def check_image_shape(a, f: Path, first: tuple, first_file: Path) -> None:
    """DataError when image ``f`` (decoded to ``a``) differs in shape from the first one."""
    if a.shape != first:
        raise DataError(f"{f}: image is {a.shape[1]}x{a.shape[0]}, but {first_file.name} is "
                        f"{first[1]}x{first[0]}; set data.source.size: [H, W] to resize")


def _read_images(folder: Path, classes: list[str], spec: ImageFolderSource, shape: list) -> TensorData:
    import numpy as np

    files, labels = image_files(folder, classes)
    arrays = []
    for rel in files:
        f = folder / rel
        a = decode_image(f, spec.grayscale, spec.size)
        if not shape:
            shape.append((a.shape, f))
        check_image_shape(a, f, *shape[0])
        arrays.append(a)
    x = np.stack(arrays)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # [N, H, W(, C)] -> [N, C, H, W]
    return TensorData(torch.from_numpy(np.ascontiguousarray(x)), torch.tensor(labels, dtype=torch.int64))


def image_folder_layout(spec: ImageFolderSource, base_dir: Path) -> tuple[Path, Path | None, list[str], str]:
    """``(train_dir, test_dir or None, classes, what)`` of an image-folder source."""
    folder = _existing_dir(spec, base_dir)
    split_layout = (folder / "train").is_dir() and bool(_class_dirs(folder / "train"))
    train_dir = folder / "train" if split_layout else folder
    classes = [d.name for d in _class_dirs(train_dir)]
    if not classes:
        raise DataError(f"data.source.path: {folder} has no class sub-folders (expected <class>/*.png or train/<class>/)")
    test_dir = None
    if split_layout and (folder / "test").is_dir() and _class_dirs(folder / "test"):
        test_dir = folder / "test"
    return train_dir, test_dir, classes, f"image-folder {folder}"


@reads("image-folder")
def _read_image_folder(spec: ImageFolderSource, base_dir: Path) -> Split:
    train_dir, test_dir, classes, what = image_folder_layout(spec, base_dir)
    shape: list = []  # the first image's shape: every image must match it
    train = _read_images(train_dir, classes, spec, shape)
    test = _read_images(test_dir, classes, spec, shape) if test_dir is not None else None
    return train, test, classes, what


# --- tensor files and Python factories

_TENSOR_KEYS = (("x", "y"), ("inputs", "labels"), ("images", "labels"))
_TEST_KEYS = (("x_test", "y_test"), ("test_inputs", "test_labels"), ("test_images", "test_labels"))


def _as_inputs(x, where: str) -> torch.Tensor:
    """uint8 stays uint8 (scaled by 1/255 later); any other dtype becomes float32. ``[N, H, W]``
    gains a channel axis, so grey images stored without one fit the image models."""
    t = _numeric(x, where, "inputs")
    if t.dim() < 2:
        raise DataError(f"{where}: inputs of shape {list(t.shape)}, expected [N, D] or [N, C, H, W]")
    if t.dim() == 3:
        t = t.unsqueeze(1)
    return t if t.dtype == torch.uint8 else t.to(torch.float32)


def _numeric(v, where: str, what: str) -> torch.Tensor:
    """``v`` as a real-valued tensor, or DataError: strings, objects and booleans are not data."""
    try:
        t = torch.as_tensor(v)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"{where}: {what} are not numeric ({type(exc).__name__}: {str(exc)[:80]})") from None
    if t.dtype == torch.bool or t.is_complex():
        raise DataError(f"{where}: {what} of type {t.dtype}, expected real numbers")
    return t


def _as_labels(y, n: int, where: str) -> torch.Tensor:
    t = _numeric(y, where, "labels")
    if t.dim() == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() != 1 or t.shape[0] != n:
        raise DataError(f"{where}: labels of shape {list(t.shape)}, expected [{n}] (one class index per input)")
    if t.is_floating_point() and not bool((t == t.round()).all()):
        raise DataError(f"{where}: labels must be integer class indices, found fractional values")
    if t.is_complex():
        raise DataError(f"{where}: labels must be integer class indices, got {t.dtype}")
    return t.to(torch.int64)


def _pair(blob: dict, keys, where: str) -> TensorData | None:
    for kx, ky in keys:
        if kx in blob and ky in blob:
            x = _as_inputs(blob[kx], f"{where}[{kx!r}]")
            return TensorData(x, _as_labels(blob[ky], len(x), f"{where}[{ky!r}]"))
    return None


@reads("tensors")
def _read_tensors(spec: TensorsSource, base_dir: Path) -> Split:
    import numpy as np

    path = _resolve(spec.path, base_dir)
    if not path.is_file():
        raise DataError(f"data.source.path: tensor file {path} not found")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                blob = {k: z[k] for k in z.files}
        elif path.suffix in (".pt", ".pth"):
            blob = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise DataError(f"data.source.path: {path}: expected a .pt or .npz file")
    except DataError:
        raise
    except Exception as exc:  # pickle, zip and numpy errors all mean "not a readable tensor file"
        raise DataError(f"{path}: cannot read tensors ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(blob, dict):
        raise DataError(f"{path}: holds a {type(blob).__name__}, expected a mapping with x/y, inputs/labels or images/labels")
    train = _pair(blob, _TENSOR_KEYS, str(path))
    if train is None:
        raise DataError(f"{path}: no x/y, inputs/labels or images/labels entries (found {sorted(map(str, blob))})")
    test = _pair(blob, _TEST_KEYS, str(path))
    if test is not None and test.x.shape[1:] != train.x.shape[1:]:
        raise DataError(f"{path}: test inputs of shape {list(test.x.shape[1:])}, expected {list(train.x.shape[1:])} like the training inputs")
    names = spec.classes or [str(c) for c in np.asarray(blob.get("classes", blob.get("class_names", []))).tolist()]
    return train, test, list(names), f"tensors {path}"


# --- a folder of tensor shards

def shard_layout(spec: TensorShardsSource, base_dir: Path) -> tuple[list, list | None, str]:
    """The training and test shards of a tensor-shards source, and its description. A shard is
    ``(x_path, y_path)`` for an ``x_<name>.npy``/``y_<name>.npy`` pair or ``(npz_path, None)``."""
    folder = _existing_dir(spec, base_dir)
    split_layout = (folder / "train").is_dir()
    train = _shards_in(folder / "train" if split_layout else folder)
    test = _shards_in(folder / "test") if split_layout and (folder / "test").is_dir() else None
    return train, test, f"tensor-shards {folder}"


def _shards_in(folder: Path) -> list:
    npz = sorted(folder.glob("*.npz"), key=_natural_key)
    xs = sorted(folder.glob("x_*.npy"), key=_natural_key)
    if npz and xs:
        raise DataError(f"{folder}: holds both .npz shards and x_*.npy shards; keep one kind")
    if npz:
        return [(p, None) for p in npz]
    if not xs:
        raise DataError(f"{folder}: no shards (x_<name>.npy with y_<name>.npy, or <name>.npz with x and y)")
    out = []
    for x in xs:
        y = x.with_name("y_" + x.name[2:])
        if not y.is_file():
            raise DataError(f"{x}: no labels file {y.name} next to it")
        out.append((x, y))
    return out


def _load_array(path: Path, key: str | None = None, mmap: bool = False):
    """A .npy array (memory-mapped when ``mmap``) or the ``key`` array of a .npz, as DataError when unreadable."""
    import numpy as np

    try:
        if key is None:
            return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        with np.load(path, allow_pickle=False) as z:
            if key not in z.files:
                raise DataError(f"{path}: no {key!r} array (found {sorted(z.files)}); a shard holds x and y")
            return z[key]
    except DataError:
        raise
    except Exception as exc:  # zip, pickle and format errors all mean "not a readable array"
        raise DataError(f"{path}: cannot read the array ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def shard_labels(shard, mmap: bool = False):
    """``(x array, labels int64 tensor)`` of one shard; x memory-mapped for a .npy pair when ``mmap``."""
    x_path, y_path = shard
    x = _load_array(x_path, None if y_path else "x", mmap=mmap and y_path is not None)
    if x.ndim < 2 or x.ndim > 4:
        raise DataError(f"{x_path}: inputs of shape {list(x.shape)}, expected [N, D], [N, H, W] or [N, C, H, W]")
    y = _load_array(y_path) if y_path else _load_array(x_path, "y")
    return x, _as_labels(y, len(x), str(y_path or x_path))


def _read_shard_set(shards: list, what: str) -> TensorData:
    parts = []
    for shard in shards:
        x, y = shard_labels(shard)
        t = _as_inputs(x, str(shard[0]))
        if parts and (t.shape[1:] != parts[0].x.shape[1:] or t.dtype != parts[0].x.dtype):
            raise DataError(f"{shard[0]}: inputs {list(t.shape[1:])} {t.dtype}, but {shards[0][0].name} has "
                            f"{list(parts[0].x.shape[1:])} {parts[0].x.dtype}; every shard must match")
        parts.append(TensorData(t, y))
    return TensorData(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))


@reads("tensor-shards")
def _read_tensor_shards(spec: TensorShardsSource, base_dir: Path) -> Split:
    train, test, what = shard_layout(spec, base_dir)
    tr = _read_shard_set(train, what)
    te = _read_shard_set(test, what) if test else None
    if te is not None and te.x.shape[1:] != tr.x.shape[1:]:
        raise DataError(f"{what}: test inputs of shape {list(te.x.shape[1:])}, expected {list(tr.x.shape[1:])} like the training inputs")
    return tr, te, list(spec.classes or []), what


def _is_label(v) -> bool:
    import numbers

    if isinstance(v, torch.Tensor):
        return v.numel() == 1 and not v.is_floating_point() and not v.is_complex()
    return isinstance(v, numbers.Integral) or (hasattr(v, "dtype") and getattr(v, "shape", None) == ()
                                                and str(v.dtype).startswith(("int", "uint")))


def materialize(dataset, where: str) -> TensorData:
    """Stack a map-style dataset of ``(input, label)`` items into one :class:`TensorData`.

    Inputs may be tensors, numpy arrays or PIL images (``[H, W(, C)]`` -> ``[C, H, W]`` uint8);
    labels ints or one-element integer tensors. All inputs must share one shape.
    """
    import numpy as np

    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise DataError(f"{where}: returned {type(dataset).__name__}, expected a Dataset with __len__ and __getitem__")
    xs, ys = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and _is_label(item[1])):
            raise DataError(f"{where}: item {i} is {type(item).__name__}, expected (input, integer label)")
        x = item[0]
        if hasattr(x, "getbands"):  # a PIL image, as torchvision data sets return without a transform
            a = np.array(x, dtype=np.uint8)  # a writable copy: PIL's buffer is read-only
            x = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        try:
            x = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x))
        except (TypeError, ValueError, RuntimeError):
            raise DataError(f"{where}: item {i} input is {type(x).__name__}, expected a tensor or array") from None
        if xs and x.shape != xs[0].shape:
            raise DataError(f"{where}: item {i} input has shape {list(x.shape)}, item 0 {list(xs[0].shape)}")
        xs.append(x)
        ys.append(int(item[1]))
    if not xs:
        raise DataError(f"{where}: the dataset is empty")
    x = torch.stack(xs)
    x = x if x.dtype == torch.uint8 else x.to(torch.float32)
    if x.dim() < 2:
        raise DataError(f"{where}: inputs are scalars, expected [D] or [C, H, W] tensors per item")
    return TensorData(x, torch.tensor(ys, dtype=torch.int64))


@reads("python")
def _read_python(spec: PythonSource, base_dir: Path) -> Split:

    fn = import_callable(spec.factory, base_dir, label="data.source.factory", error=DataError)
    try:
        out = fn(**spec.args)
    except Exception as exc:  # user code: report, do not crash with its traceback
        raise DataError(f"data.source.factory {spec.factory!r}: calling it with args {spec.args} failed: "
                        f"{type(exc).__name__}: {exc}") from exc
    where = f"data.source.factory {spec.factory!r}"
    if isinstance(out, tuple) and len(out) == 2 and not _is_label(out[1]):
        train_ds, test_ds = out
    else:
        train_ds, test_ds = out, None
    train = materialize(train_ds, where + " (train)")
    test = materialize(test_ds, where + " (test)") if test_ds is not None else None
    if test is not None and test.x.shape[1:] != train.x.shape[1:]:
        raise DataError(f"{where}: test inputs of shape {list(test.x.shape[1:])}, expected {list(train.x.shape[1:])}")
    names = spec.classes or list(getattr(train_ds, "classes", None) or [])
    return train, test, [str(c) for c in names], f"python {spec.factory}"

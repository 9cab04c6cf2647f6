"""The recipe's ``data:`` section: the sources (one model per ``kind``), normalisation,
augmentation and batch sizes. Schema only, torch-free; reading the data is :mod:`kdcli.data.loader`
and :mod:`kdcli.data.sources`."""

from __future__ import annotations

from typing import Annotated, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator, model_validator
from pydantic_core import PydanticCustomError


class _Strict(BaseModel):
    # allow_inf_nan=False: a nan mean or std, or an inf fraction, would poison every batch
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# Every data source a recipe may name: ``@_source`` adds its spec class here and the tagged
# union ``SourceSpec`` is derived from it. A new source is one class here, decorated, plus its
# reader in kdcli/sources.py (a function decorated ``@reads("kind")``).
SOURCE_SPECS: list[type] = []


def _source(cls):
    SOURCE_SPECS.append(cls)
    return cls


@_source
class DigitsSource(_Strict):
    """scikit-learn's bundled 8x8 digits (1,797 images, shape (1, 8, 8)); the last 360 are the test split."""

    kind: Literal["digits"] = "digits"


@_source
class IdxSource(_Strict):
    """MNIST layout: ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``, ``t10k-*`` as test."""

    kind: Literal["idx"]
    path: str
    classes: list[str] | None = None


@_source
class Cifar10BinSource(_Strict):
    """CIFAR-10 binary version: ``data_batch_*.bin`` as train, ``test_batch*.bin`` as test."""

    kind: Literal["cifar10-bin"]
    path: str
    classes: list[str] | None = None


_MAX_SIDE = 8192  # pixels of a resized image side: an 8k x 8k x 3 uint8 image is 200 MB


def _check_size(v):
    """An image size [H, W] within [1, _MAX_SIDE], or None."""
    if v is not None and not all(1 <= s <= _MAX_SIDE for s in v):
        raise ValueError(f"size must be two integers [H, W] in [1, {_MAX_SIDE}] (got {list(v)})")
    return v


@_source
class ImageFolderSource(_Strict):
    """One sub-folder per class (or ``train/`` and ``test/`` folders of those); ``size`` resizes."""

    kind: Literal["image-folder"]
    path: str
    size: tuple[int, int] | None = None
    grayscale: bool = False

    @field_validator("size")
    @classmethod
    def _size(cls, v):
        return _check_size(v)


@_source
class TensorsSource(_Strict):
    """A ``.pt`` (weights_only) or ``.npz`` file with inputs/labels (x/y, inputs/labels or images/labels)."""

    kind: Literal["tensors"]
    path: str
    classes: list[str] | None = None


@_source
class TensorShardsSource(_Strict):
    """A folder of shards: ``x_<name>.npy`` with ``y_<name>.npy`` pairs, or ``*.npz`` files with
    ``x``/``y`` arrays; ``train/`` and ``test/`` sub-folders of those, or the shards directly
    (training only). Shards are concatenated in natural name order. Streaming memory-maps the
    ``.npy`` pairs (``.npz`` shards can only be read into memory)."""

    kind: Literal["tensor-shards"]
    path: str
    classes: list[str] | None = None


@_source
class PythonSource(_Strict):
    """``pkg.mod:fn`` or ``file.py:fn`` returning a Dataset of (input, label), or a (train, test) tuple."""

    kind: Literal["python"]
    factory: str
    args: dict[str, JsonValue] = Field(default_factory=dict)  # plain values: a run records them as JSON
    classes: list[str] | None = None


SourceSpec = Annotated[Union[tuple(SOURCE_SPECS)], Field(discriminator="kind")]
SOURCE_KINDS: tuple[str, ...] = tuple(get_args(c.model_fields["kind"].annotation)[0] for c in SOURCE_SPECS)
MAX_WORKERS = 256
STREAMING_KINDS = ("image-folder", "tensor-shards")  # the sources data.loading: stream can read sample by sample


class NormalizeStats(_Strict):
    """Fixed per-channel statistics, in the [0, 1] scale of the inputs (uint8 pixels are divided by 255)."""

    mean: list[float]
    std: list[float]

    @model_validator(mode="after")
    def _check(self):
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError("mean and std need the same, non-zero length (one value per channel)")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        return self


class AugmentSpec(_Strict):
    """Batch-wise training augmentation: random crop with zero padding, horizontal flip, and a random
    translation by up to ±``jitter`` pixels (Hinton et al. 2015 jitter MNIST by up to 2 pixels)."""

    crop_padding: int = Field(0, ge=0, le=_MAX_SIDE)
    hflip: bool = False
    jitter: int = Field(0, ge=0, le=_MAX_SIDE)

    @property
    def active(self) -> bool:
        """True when any augmentation is switched on."""
        return bool(self.crop_padding or self.hflip or self.jitter)


class SplitFraction(_Strict):
    """A seeded ``fraction`` of one of the source's own splits: ``train`` (data a teacher trained
    elsewhere has usually seen) or ``test`` (the held-out split; the rest of it stays the test part,
    disjoint from the validation part)."""

    split: Literal["train", "test"]
    fraction: float = Field(gt=0, lt=1)


class OtherData(_Strict):
    """Evaluation data from another source, of any kind: its ``split`` (``auto``: its test split
    when it has one, else its training split)."""

    source: SourceSpec
    split: Literal["auto", "train", "test"] = "auto"

    @field_validator("source", mode="before")
    @classmethod
    def _bare_kind(cls, v):
        return {"kind": v} if isinstance(v, str) else v


HELD_OUT_FRACTION = 0.5  # data.val auto, teacher from a checkpoint: half of the held-out split validates


class InputAdapt(_Strict):
    """``data.input``: make every source's inputs fit the model: ``size`` [H, W] reached by
    ``fit`` (``resize``: bilinear; ``pad``: zero padding around the centre, then a centre crop when
    the source is larger), and ``channels`` (1 -> C replicates the channel; 3 -> 1 takes the
    luminance, ITU-R BT.601 weights)."""

    size: tuple[int, int] | None = None
    fit: Literal["resize", "pad"] = "resize"
    channels: int | None = Field(None, ge=1, le=4096)

    @field_validator("size")
    @classmethod
    def _size(cls, v):
        return _check_size(v)

    @property
    def active(self) -> bool:
        """True when the inputs are changed at all."""
        return self.size is not None or self.channels is not None


class DataSpec(_Strict):
    """The recipe's ``data:`` section."""

    # `source: digits` is accepted as shorthand (see _bare_kind); the JSON Schema says so too.
    source: SourceSpec = Field(default_factory=DigitsSource,
                               json_schema_extra=lambda s: s.update(anyOf=[{"const": "digits"}, {
                                   k: s.pop(k) for k in list(s) if k in ("oneOf", "discriminator")}]))
    val_fraction: float = Field(0.1, ge=0, le=0.9)
    # Which data validates (judges steps, the accuracy budget, the teacher's reference figure) and
    # which is the test part reported at the end. ``auto``: a seeded val_fraction of the training
    # split when kdcli trains the teacher; half of the held-out split when the teacher comes from a
    # checkpoint (it has usually trained on all of the training split).
    val: Union[Literal["auto", "test"], SplitFraction, OtherData] = "auto"
    test: Union[Literal["test", "none"], OtherData] = "test"
    input: InputAdapt = Field(default_factory=InputAdapt)
    normalize: Union[Literal["auto", "none"], NormalizeStats] = "auto"
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    batch_size: int = Field(128, ge=1, le=1 << 20)
    eval_batch_size: int = Field(512, ge=1, le=1 << 20)
    limit_train: int | None = Field(None, ge=1, le=10**12)
    limit_eval: int | None = Field(None, ge=1, le=10**12)
    # How the data reaches the model. ``memory``: read whole once, batches sliced from tensors
    # (fastest for small sets). ``stream``: read sample by sample from disk by ``workers``
    # DataLoader processes (image-folder and tensor-shards sources). ``auto``: memory when the
    # decoded set fits in kdcli.data.stream.RAM_SHARE (25 %) of the available memory, else stream.
    loading: Literal["auto", "memory", "stream"] = "auto"
    # DataLoader worker processes when streaming; ``auto``: min(4, CPU cores); 0 reads in the
    # training process itself.
    workers: Union[Literal["auto"], int] = "auto"

    @field_validator("source", mode="before")
    @classmethod
    def _bare_kind(cls, v):
        # `source: digits` is shorthand for {kind: digits}; going through the tagged union (not a
        # Literal alternative) makes `{kind: idx}` without a path report the missing field.
        return {"kind": v} if isinstance(v, str) else v

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, v):
        if v == "auto":
            return v
        if isinstance(v, str) and v.strip().isdigit():  # --set data.workers=2 gives a string
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_WORKERS:
            raise ValueError(f"expected auto or a number of worker processes in [0, {MAX_WORKERS}] (got {v!r})")
        return v

    @model_validator(mode="after")
    def _streamable(self):
        kind = self.source_spec.kind
        if self.loading == "stream" and kind not in STREAMING_KINDS:
            raise PydanticCustomError("field_error", "{msg}", {
                "field": "loading", "msg": f"stream reads only {' and '.join(STREAMING_KINDS)} sources, not {kind} "
                                           "(use auto or memory)"})
        return self

    @property
    def source_spec(self):
        """The source as a model (``"digits"`` becomes :class:`DigitsSource`)."""
        return DigitsSource() if isinstance(self.source, str) else self.source

"""Recipes: the pydantic models of a kdcli recipe, and YAML loading with precise errors.

A recipe says where the data is, what the teacher is (or how to train one), what the student
is, which distillation losses and pruning criterion to use, the resource target and the accuracy
budget, and how to export. Unknown keys, wrong types and impossible values are errors that name
the file, the line and the field path::

    recipes/bad.yaml:12: prune.steps: Input should be greater than or equal to 1 (got 0)
    --set 'prune.steps=0': prune.steps: Input should be greater than or equal to 1 (got 0)

Loading is safe YAML that also refuses a repeated key; numbers must be finite and within bounds;
a model name must be a built-in or a ``module:factory`` / existing ``file.py:factory`` (nothing is
imported to validate a recipe).

Units: ``target.macs`` and ``target.params`` are fractions of the teacher's when <= 1, absolute
counts when > 1; ``target.max_accuracy_drop`` is a fraction (0.01 = one percentage point);
``target.latency_ms`` is milliseconds and ``target.speedup`` a factor (teacher / student latency),
both at ``target.batch_size`` (see :class:`TargetSpec`).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic_core import PydanticCustomError
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, JsonValue, Tag, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from kdcli import __version__
from kdcli.config.data import SOURCE_KINDS, DataSpec, PythonSource
from kdcli.config.importance import ImportanceName
from kdcli.config.ensembles import ENSEMBLE_KINDS, DiversifiedSpec, SpecialistsSpec
from kdcli.errors import RecipeError
from kdcli.config.losses import DEFAULT_LOSSES, LOSS_KINDS, LossSpec
from kdcli.models import BUILTIN, builtin_names  # a name list: kdcli.models imports no torch
from kdcli.config.train import TrainSpec


class Strict(BaseModel):
    # allow_inf_nan=False: no recipe value means anything at inf or nan (`macs: 1e400` is inf)
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


def field_error(field: str, msg: str) -> PydanticCustomError:
    """An error about the sub-field ``field`` (dotted, relative to the value validated).

    Validators of a whole section raise it so that the message names the exact key and line
    (``target.macs``, not ``target``); :func:`parse_recipe` appends ``field`` to the error's location.
    """
    return PydanticCustomError("field_error", "{msg}", {"msg": msg, "field": field})


class ModelRef(Strict):
    """A model by name (built-in, ``package.module:factory`` or ``file.py:factory``) and args."""

    model: str
    # JSON values: they are stored in the model file (.kdc), and YAML's dates, sets and bytes are not
    model_args: dict[str, JsonValue] = Field(default_factory=dict)


class TeacherSpec(ModelRef):
    checkpoint: str | None = None
    train: TrainSpec = Field(default_factory=lambda: TrainSpec(epochs=20))


def _teacher_kind(v: Any) -> str:
    kind = v.get("ensemble") if isinstance(v, dict) else getattr(v, "ensemble", None)
    return "single-model" if kind is None else str(kind)


AnyTeacherSpec = Annotated[
    Union[Annotated[TeacherSpec, Tag("single-model")], Annotated[SpecialistsSpec, Tag("specialists")],
          Annotated[DiversifiedSpec, Tag("diversified")]],
    Discriminator(_teacher_kind, custom_error_type="teacher_kind",
                  custom_error_message="ensemble: expected specialists or diversified "
                                       "(leave the key out for a single model)"),
]


class StudentSpec(Strict):
    """``from: pruned-teacher`` (the default) prunes a copy of the teacher; a model spec declares
    another architecture, trained by distillation and pruned only if ``prune`` says so."""

    from_: Literal["pruned-teacher"] | None = Field("pruned-teacher", alias="from")
    model: str | None = None
    model_args: dict[str, JsonValue] = Field(default_factory=dict)
    prune: bool | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "StudentSpec":
        if self.model is not None:
            self.from_ = None
        if self.prune is None:
            self.prune = self.model is None
        return self


class TeacherTrainingSpec(Strict):
    """``distill.train_teacher``: the "train the teacher" step of DKDP, between pruning steps.

    After each kept step the teacher that teaches is fine-tuned for ``epochs`` at ``lr`` with
    cross-entropy on the transfer set plus ``kd_weight`` × Hinton KD (at ``temperature``) toward
    the current, frozen student: one direction of Deep Mutual Learning (Zhang et al. 2018), which
    moves the teacher towards what the pruned student can represent, a student-friendly teacher
    (Park et al. 2021, "Learning Student-Friendly Teacher Networks"). ``kd_weight: 0`` is plain
    fine-tuning. The accuracy budget stays measured against the original teacher."""

    epochs: int = Field(1, ge=1, le=1000)
    lr: float = Field(0.005, gt=0, le=10)
    kd_weight: float = Field(0.5, ge=0, le=1e4)
    temperature: float = Field(4.0, gt=0, le=1000)


class DistillSpec(Strict):
    losses: list[LossSpec] = Field(default_factory=lambda: list(DEFAULT_LOSSES))
    train: TrainSpec = Field(default_factory=lambda: TrainSpec(epochs=3, lr=0.02))
    granularity: str | None = None  # path to a granularity.json written by `kdcli analyze`
    cache_teacher: bool = True
    train_teacher: TeacherTrainingSpec | None = None

    @field_validator("losses")
    @classmethod
    def _not_empty(cls, v):
        if not v:
            raise ValueError("at least one loss is needed")
        return v


class PruneSpec(Strict):
    importance: ImportanceName = "magnitude"
    steps: int = Field(4, ge=1, le=100)
    max_retries: int = Field(2, ge=0, le=10)
    # after an undone step the schedule grows (smaller steps) up to max_steps (default 3 x steps)
    max_steps: int | None = Field(None, ge=1, le=300)
    # how a step's cut is spread over the groups: below one threshold τ on the group-normalised
    # scores (global), the same fraction of every group (uniform; then τ is that fraction), or
    # by measured damage per MAC saved (sensitivity: each group pruned alone at each of
    # sensitivity_ratios, the output shift measured on the score batches)
    allocation: Literal["global", "uniform", "sensitivity"] = "global"
    sensitivity_ratios: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75])
    # a step may cost step_tolerance x target.max_accuracy_drop before later distillation recovers it
    step_tolerance: float = Field(2.0, ge=1, le=100)
    # channel counts left are multiples of round_to (groups no wider stay whole); 1: any width.
    # 8 by default: onnxruntime's CPU convolutions run in blocks of 8 channels on AVX2 (NCHWc;
    # 16 on AVX-512, where 16 suits better) and fp16 tensor cores want multiples of 8; with
    # any width a MobileNetV2 at half the MACs ran slower than its teacher (README, "round_to")
    round_to: int | None = Field(8, ge=1, le=1024)
    ignored_layers: list[str] = Field(default_factory=list)
    ratios_from: str | None = None  # analysis.json whose suggested ratios seed the first step
    score_batches: int = Field(4, ge=1, le=10_000)
    final_epochs: int = Field(0, ge=0, le=10_000)

    @field_validator("sensitivity_ratios")
    @classmethod
    def _ratios(cls, v):
        if not v or any(not 0 < r < 1 for r in v):
            raise ValueError(f"ratios must be a non-empty list of numbers in (0, 1) (got {_short(v)})")
        return sorted(set(float(r) for r in v))

    @model_validator(mode="after")
    def _max_steps(self) -> "PruneSpec":
        if self.max_steps is not None and self.max_steps < self.steps:
            raise field_error("max_steps", f"must be at least steps ({self.steps}), got {self.max_steps}")
        return self

    @property
    def step_limit(self) -> int:
        """The most steps a schedule may grow to after undone steps."""
        return self.max_steps if self.max_steps is not None else 3 * self.steps


class TargetSpec(Strict):
    """``target:``. Resources: ``macs``/``params`` (fractions of the teacher's when <= 1, counts
    above), ``latency_ms`` (the student's median onnxruntime latency, ms) and ``speedup`` (the
    teacher's median onnxruntime latency over the student's, both timed alternately), measured
    on this machine at ``batch_size``: by default the largest of ``export.batch_sizes`` with a
    ``speedup`` (what a bare ``speedup`` gate reads) and 1 with ``latency_ms`` alone (what a bare
    ``latency_ms`` gate reads); with both, give it. Both drive the loop: each step aims at a
    latency through a latency model of the student (:mod:`kdcli.export.latency_model`), and the
    export report's measurement judges the result. ``allow_slower``: a student measured slower
    than its teacher at some batch size (beyond the measurement noise) is a warning, not a failed
    run (exit 3), for a recipe where speed does not matter."""

    # absolute counts up to 1e18 (an exa-MAC): beyond that a count is a typo, not a model
    macs: float | None = Field(None, gt=0, le=1e18)
    params: float | None = Field(None, gt=0, le=1e18)
    latency_ms: float | None = Field(None, gt=0, le=1e7)
    speedup: float | None = Field(None, ge=1, le=1000)
    batch_size: int | None = Field(None, ge=1, le=65536)
    allow_slower: bool = False
    max_accuracy_drop: float = Field(0.01, ge=0, le=1)

    # A field validator, not a model validator: its errors then name target.macs, not target.
    @field_validator("macs", "params")
    @classmethod
    def _fraction_or_count(cls, v: float | None) -> float | None:
        if v is not None and v > 1 and v != int(v):
            raise ValueError(f"a fraction must be <= 1, an absolute count a whole number (got {v})")
        return v

    @model_validator(mode="after")
    def _speed(self) -> "TargetSpec":
        if self.batch_size is not None and self.speedup is None and self.latency_ms is None:
            raise field_error("batch_size", "the batch size of a speedup or latency_ms target; set one of them "
                                            "(or remove batch_size)")
        if self.speedup is not None and self.latency_ms is not None and self.batch_size is None:
            raise field_error("batch_size", "required with both speedup and latency_ms (alone, speedup is "
                                            "measured at the largest of export.batch_sizes and latency_ms at 1)")
        if self.allow_slower and self.speedup is not None:
            raise field_error("allow_slower", f"contradicts speedup {self.speedup:g}: a speed-up target "
                                              "asks for a faster student; remove one of them")
        return self

    def resolved_batch_size(self, export_batch_sizes) -> int:
        """The batch size the latency targets are measured at (see the class docstring)."""
        if self.batch_size is not None:
            return int(self.batch_size)
        if self.speedup is not None:
            return int(max(export_batch_sizes))
        return 1


QUANTIZE_METHODS = ("none", "dynamic")  # export.quantize, --quantize, kdcli.export(quantize=)


class ExportSpec(Strict):
    """``threads``: onnxruntime intra-op threads of every latency measurement (and torch's for the
    eager reference); null: one per CPU core the process may use. ``quantize: dynamic`` also
    writes ``student.int8.onnx`` (int8 weights, onnxruntime ``quantize_dynamic``), measured with
    the others."""

    enabled: bool = True
    opset: int = Field(18, ge=18, le=23)
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 64])
    fail_if: list[str] = Field(default_factory=list)
    latency_budget_s: float = Field(2.0, gt=0, le=3600)
    threads: int | None = Field(None, ge=1, le=4096)
    quantize: Literal[QUANTIZE_METHODS] = "none"

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, v):
        if not v or any(not 1 <= b <= 65536 for b in v):
            raise ValueError(f"batch sizes must be a non-empty list of integers in [1, 65536] (got {_short(v)})")
        return v

    def settings(self, *, batch_sizes=None, fail_if=None, latency_budget_s=None, threads=None, quantize=None,
                 opset=None) -> dict:
        """The export's settings as :func:`kdcli.export.onnx.export_report` takes them: each one
        given (a flag, an argument) wins over this section's, which holds the defaults."""
        return {"batch_sizes": tuple(batch_sizes or self.batch_sizes), "gates": list(fail_if or self.fail_if),
                "time_budget_s": self.latency_budget_s if latency_budget_s is None else latency_budget_s,
                "threads": self.threads if threads is None else threads, "quantize": quantize or self.quantize,
                "opset": opset or self.opset}


class AnalyzeSpec(Strict):
    ratios: list[float] = Field(default_factory=lambda: [round(0.1 * i, 1) for i in range(1, 10)])
    target_macs: float = Field(0.5, gt=0, le=1)
    eval_samples: int = Field(1000, ge=1, le=10_000_000)
    critical_fraction: float = Field(0.1, gt=0, lt=1)

    @field_validator("ratios")
    @classmethod
    def _in_range(cls, v):
        if not v or any(not 0 <= r < 1 for r in v):
            raise ValueError("ratios must be in [0, 1)")
        return sorted(v)


class Recipe(Strict):
    seed: int = Field(0, ge=0, le=2**32 - 1)  # the range every seeded library accepts (numpy's)
    device: str = "auto"
    out_dir: str | None = None
    data: DataSpec = Field(default_factory=DataSpec)
    teacher: AnyTeacherSpec
    student: StudentSpec = Field(default_factory=StudentSpec)
    distill: DistillSpec = Field(default_factory=DistillSpec)
    prune: PruneSpec = Field(default_factory=PruneSpec)
    target: TargetSpec = Field(default_factory=TargetSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    analyze: AnalyzeSpec = Field(default_factory=AnalyzeSpec)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        check_device_string(v)
        return v

    @field_validator("data")
    @classmethod
    def _data(cls, v: DataSpec, info: ValidationInfo) -> DataSpec:
        if isinstance(v.source, PythonSource):
            _check_factory(v.source.factory, info, "source.factory")
        for key in ("val", "test"):
            other = getattr(v, key)
            if isinstance(getattr(other, "source", None), PythonSource):
                _check_factory(other.source.factory, info, f"{key}.source.factory")
        return v

    @property
    def teacher_trained_elsewhere(self) -> bool:
        """True when the teacher (or the generalist of specialists) is read from a checkpoint:
        it has usually trained on the whole training split, so ``data.val: auto`` validates on
        held-out data instead (see :func:`kdcli.data.loader.resolve_val`)."""
        t = self.teacher
        return getattr(t, "checkpoint", None) is not None or \
            getattr(getattr(t, "generalist", None), "checkpoint", None) is not None

    @field_validator("teacher")
    @classmethod
    def _teacher_models(cls, v, info: ValidationInfo):
        if isinstance(v, SpecialistsSpec):
            if v.generalist.model is not None:
                _check_factory(v.generalist.model, info, "generalist.model")
        else:
            _check_factory(v.model, info, "model")
        return v

    @field_validator("student")
    @classmethod
    def _student_model(cls, v: StudentSpec, info: ValidationInfo) -> StudentSpec:
        if v.model is not None:
            _check_factory(v.model, info, "model")
        return v

    @model_validator(mode="after")
    def _ensemble_student(self) -> "Recipe":
        if isinstance(self.teacher, (SpecialistsSpec, DiversifiedSpec)) and self.student.model is None:
            raise field_error("student.model", "an ensemble teacher cannot be pruned into the student; "
                                               "declare the student's architecture (student: {model: ...})")
        if isinstance(self.teacher, (SpecialistsSpec, DiversifiedSpec)) and self.distill.train_teacher is not None:
            raise field_error("distill.train_teacher", "an ensemble teacher is not fine-tuned between steps; "
                                                       "remove train_teacher or use a single teacher")
        return self

    # Set by load_recipe: where relative paths resolve, and what the file said.
    _path: Path | None = None
    _sha256: str = ""

    @property
    def base_dir(self) -> Path:
        return self._path.parent if self._path else Path.cwd()

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def sha256(self) -> str:
        return self._sha256

    def resolve(self, p: str | None) -> Path | None:
        """A path from the recipe, relative to the recipe's folder."""
        if p is None:
            return None
        q = Path(p).expanduser()
        return q if q.is_absolute() else self.base_dir / q

    def default_out_dir(self) -> Path:
        if self.out_dir:
            return self.resolve(self.out_dir)
        stem = self._path.stem if self._path else "run"
        return Path("runs") / stem


def check_device_string(v: str) -> None:
    # at most 4 digits: torch.device() fails on an index beyond 64 bits before kdcli can explain
    if not re.fullmatch(r"auto|cpu|cuda(:\d{1,4})?", v):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")


_FACTORY = re.compile(r"(?P<target>.+):(?P<attr>[A-Za-z_]\w*)")


def _check_factory(spec: str, info: ValidationInfo, field: str) -> None:
    """Check a model name (a built-in, ``pkg.mod:factory`` or ``path/to/file.py:factory``) or,
    for ``field`` ``source.factory``, a data factory (no built-ins), without importing anything:
    validating a recipe runs no user code. A ``.py`` file must exist, relative to the recipe's
    folder (``base_dir`` in the validation context; without one the file is not looked for)."""
    is_model = not field.endswith("source.factory")
    if is_model and spec in BUILTIN:
        return
    if is_model and ":" not in spec:
        raise field_error(field, f"unknown model {spec!r}; built-ins: {', '.join(builtin_names())} "
                                 "(or pkg.mod:factory, path/to/file.py:factory)")
    m = _FACTORY.fullmatch(spec)
    if m is None:
        raise field_error(field, f"expected 'pkg.mod:factory' or 'path/to/file.py:factory' (got {spec!r})")
    target = m["target"]
    if not target.endswith(".py"):
        if not all(part.isidentifier() for part in target.split(".")):
            raise field_error(field, f"expected 'pkg.mod:factory' or 'path/to/file.py:factory'; {target!r} is "
                                     f"neither a module path nor a .py file (got {spec!r})")
        return
    base_dir = (info.context or {}).get("base_dir")
    if base_dir is None:
        return
    try:
        path = Path(target).expanduser()
        path = path if path.is_absolute() else Path(base_dir) / path
        found = path.is_file()
    except (OSError, ValueError, RuntimeError):  # a name too long, a NUL byte, ~nosuchuser
        path, found = Path(target), False
    if not found:
        raise field_error(field, f"file {str(path)!r} not found (got {spec!r}; a relative path starts "
                                 "at the recipe's folder)")


# ----------------------------------------------------------------------------- YAML loading

_MAX_DEPTH = 64  # a recipe nests 5 levels; far deeper is a mistake (or an attack on the parser)
_MAX_NODES = 100_000  # values after expanding aliases: refuses a "billion laughs" document


class DuplicateKeyError(yaml.MarkedYAMLError):
    """A mapping repeats a key (PyYAML would keep the last silently); ``path`` is its key path."""

    def __init__(self, path: tuple, mark):
        super().__init__(problem="duplicate key", problem_mark=mark)
        self.path = path


class _RecipeLoader(yaml.SafeLoader):
    """Safe loading (Python tags such as ``!!python/object/apply`` stay refused), where a
    constructor's plain exception (``2001-13-45`` is no date, ``!!float abc`` no float) becomes a
    YAML error that carries the value's line."""

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, AttributeError, OverflowError, IndexError, KeyError) as exc:
            what = node.tag.rsplit(":", 1)[-1]
            value = f" {_short(node.value)}" if isinstance(node, yaml.ScalarNode) else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {what}{value}: {exc}", node.start_mark) from None


def _check_tree(loader: _RecipeLoader, root: yaml.Node) -> None:
    """Refuse duplicate keys, an alias inside the value it names, nesting deeper than _MAX_DEPTH
    and more than _MAX_NODES values once aliases are expanded. Raises yaml.MarkedYAMLError."""
    count = 0

    def walk(node: yaml.Node, path: tuple, stack: tuple) -> None:
        nonlocal count
        count += 1
        if count > _MAX_NODES:
            raise yaml.MarkedYAMLError(problem=f"more than {_MAX_NODES} values once aliases are expanded",
                                       problem_mark=node.start_mark)
        if id(node) in stack:
            raise yaml.MarkedYAMLError(problem="an alias inside the value it names", problem_mark=node.start_mark)
        if len(stack) > _MAX_DEPTH:
            raise yaml.MarkedYAMLError(problem=f"nested more than {_MAX_DEPTH} levels deep",
                                       problem_mark=node.start_mark)
        inner = stack + (id(node),)
        if isinstance(node, yaml.MappingNode):
            keys: dict = {}
            for k, v in node.value:
                if k.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden
                    walk(v, path, inner)
                    continue
                key = loader.construct_object(k, deep=True)
                try:
                    first = keys.setdefault(key, k)
                except TypeError:  # an unhashable key: construction reports it
                    first = k
                step = key if isinstance(key, str) else _MapKey(key)
                if first is not k:
                    raise DuplicateKeyError(path + (step,), k.start_mark)
                walk(v, path + (step,), inner)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, path + (i,), inner)

    walk(root, (), ())


def load_yaml(text: str) -> tuple[yaml.Node | None, Any]:
    """The node tree (for line numbers) and the value of one YAML document, safely loaded with
    the checks of :func:`_check_tree`. Raises yaml.YAMLError (:class:`DuplicateKeyError` for a
    repeated key)."""
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        _check_tree(loader, node)
        return node, loader.construct_document(node)
    except RecursionError:  # the parser recurses per level: thousands of `[` exhaust the stack
        raise yaml.YAMLError(f"nested more than {_MAX_DEPTH} levels deep") from None
    finally:
        loader.dispose()


def _yaml_message(exc: yaml.YAMLError, source: str, text: str) -> str:
    """``SOURCE:LINE: KEY: duplicate key`` or ``SOURCE:LINE: not valid YAML (problem)``."""
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:
        where = f"{source}:{mark.line + 1}"
    elif isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow: its position
        where = f"{source}:{text.count(chr(10), 0, exc.position) + 1}"
    else:
        where = source
    if isinstance(exc, DuplicateKeyError):
        return f"{where}: {_format_loc(exc.path)}: duplicate key"
    problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
    return f"{where}: not valid YAML ({problem})"


# ----------------------------------------------------------------------------- error messages


def _line_of(node: yaml.Node | None, loc: tuple) -> int | None:
    """Line (1-based) of the YAML node at the pydantic error location ``loc``."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            # the last match: a key after a `<<` merge overrides the merged one
            for k, v in reversed(node.value):
                if isinstance(k, yaml.ScalarNode) and k.value == str(key):
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and 0 <= key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    return line


_PLAIN_KEY = re.compile(r"[A-Za-z_][\w-]*")


class _MapKey:
    """A mapping key that is not a string (``1: x``), in a key path: printed as itself, where an
    int would print as a list index."""

    def __init__(self, key: Any):
        self.key = key

    def __repr__(self) -> str:
        return repr(self.key)

    def __str__(self) -> str:
        return str(self.key)


def _format_loc(loc: tuple) -> str:
    """``distill.losses[1].temperature``; a key that is not a plain name is quoted (``'a b'``),
    so that a key with a newline in it cannot break the one-line message."""
    out = ""
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        else:
            text = part if isinstance(part, str) and _PLAIN_KEY.fullmatch(part) else repr(part)
            out += ("." if out else "") + text
    return out


def _clean_loc(loc: tuple, obj: Any) -> tuple:
    """The key path of a pydantic error location, without pydantic's own labels.

    pydantic puts union tags and validator or class names into ``loc`` (``kd``,
    ``function-after[...]``, ``NormalizeStats``). Walking the input tells them apart from keys: a
    key is in the input, and only the last part (a missing key) may be absent from it."""
    out: list = []
    cur = obj
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(cur, dict) and part in cur:
            out.append(part if isinstance(part, str) else _MapKey(part))
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            out.append(part)
            cur = cur[part]
        elif isinstance(part, str) and ("[" in part or part in _TAGS or not last):
            continue
        else:
            out.append(part)
            cur = None
    return tuple(out)


# Union tags pydantic puts into an error's location: the kinds of each registry, the teacher
# kinds, and the type names of plain unions. Derived, so a new kind needs no edit here.
_TAGS = {*LOSS_KINDS, *SOURCE_KINDS, "single-model", *ENSEMBLE_KINDS,
         "str", "int", "float", "bool", "list[str]", "dict[str,any]", "literal['pruned-teacher']", "none"}


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _override_for(loc: tuple, missing: bool, sets: list[tuple[str, tuple[str, ...]]]) -> str | None:
    """The last ``--set`` that wrote the value at ``loc``, inside it or around it (for a missing
    key: that wrote into its mapping); None when the error is the file's own."""
    path = tuple(str(p) for p in (loc[:-1] if missing else loc))
    for item, parts in reversed(sets):
        n = min(len(path), len(parts))
        if n and path[:n] == parts[:n]:
            return item
    return None


def _error_loc(err: dict, obj: Any) -> tuple:
    loc = _clean_loc(tuple(err["loc"]), obj)
    if err["type"] == "field_error":  # raised for a sub-field: see field_error()
        loc += tuple(err["ctx"]["field"].split("."))
    return loc


def _explain(exc: ValidationError, obj: dict, node: yaml.Node | None, source: str,
             sets: list[tuple[str, tuple[str, ...]]]) -> str:
    """One line for the first error: ``SOURCE:LINE: field.path: what was expected (got X)``, or
    ``--set 'K=V': field.path: ...`` when a ``--set`` wrote the value."""
    errors = exc.errors()
    located = [(_error_loc(e, obj), e) for e in errors]
    loc, err = located[0]
    # A union reports every member's error: `normalize: {std: [.nan]}` fails as 'auto' | 'none' and
    # as {mean, std}; a later error deeper under the first one's key is the specific one.
    for deeper, e in located[1:]:
        if len(deeper) > len(loc) and deeper[:len(loc)] == loc:
            loc, err = deeper, e
    field = _format_loc(loc) or "(top level)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required field missing"
    elif err["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    elif err["type"] == "invalid-json-value":  # a YAML date, set or !!binary in model_args
        msg = "expected a string, number, true/false, null, list or mapping"
    got = err.get("input")
    # value and field errors come from our validators, which quote the value themselves
    suffix = (f" (got {_short(got)})" if err["type"] not in ("extra_forbidden", "missing", "value_error", "field_error")
              and not isinstance(got, dict | list) else "")
    more = f" [and {len(errors) - 1} more]" if len(errors) > 1 else ""
    item = _override_for(loc, err["type"] == "missing", sets)
    if item is not None:
        where = f"--set {item!r}"
    else:
        line = _line_of(node, loc)
        where = f"{source}:{line}" if line else source
    return " ".join(f"{where}: {field}: {msg}{suffix}{more}".splitlines())


# ----------------------------------------------------------------------------- parsing


def _override_parts(item: str) -> tuple[str, tuple[str, ...], str]:
    """``(key, key path, raw value)`` of a ``--set``; ``losses[0]`` in the key is ``losses.0``."""
    key, sep, raw = item.partition("=")
    parts = tuple(re.sub(r"\[(\d+)\]", r".\1", key.strip()).split("."))
    if not sep or not all(p.strip() for p in parts):
        raise RecipeError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. prune.steps=2")
    return key, parts, raw


def _slot(cur: dict | list, part: str, item: str, where: tuple[str, ...]) -> str | int:
    """The key of ``part`` in a mapping, or its index in a list (``distill.losses.0``)."""
    if not isinstance(cur, list):
        return part
    if not part.isdigit() or int(part) >= len(cur):
        raise RecipeError(f"--set {item!r}: {'.'.join(where)} is a list of {len(cur)}; expected an index "
                          f"from 0 to {len(cur) - 1} (got {part!r})")
    return int(part)


def apply_overrides(obj: dict, overrides: list[str] | tuple[str, ...], source: str) -> dict:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to a recipe mapping; a list
    item is addressed by its index (``distill.losses.0.weight`` or ``distill.losses[0].weight``)."""
    for item in overrides:
        _, parts, raw = _override_parts(item)
        try:
            value = load_yaml(raw)[1] if raw.strip() else None
        except DuplicateKeyError as exc:
            raise RecipeError(f"--set {item!r}: {_format_loc(parts + exc.path)}: duplicate key") from None
        except yaml.YAMLError:
            value = raw  # not YAML (`@home`, `a: b: c`): the text itself, as a string
        cur = obj
        for i, part in enumerate(parts[:-1]):
            slot = _slot(cur, part, item, parts[:i])
            nxt = cur[slot] if isinstance(cur, list) else cur.get(slot)
            if nxt is None:
                nxt = {}
            elif isinstance(nxt, str) and part == "source":
                nxt = {"kind": nxt}
            if not isinstance(nxt, dict | list):
                raise RecipeError(f"--set {item!r}: {source}: {'.'.join(parts[:i + 1])} is not a mapping or a list")
            # a copy: a YAML alias shares the value with another key, which must not change too
            cur[slot] = nxt = type(nxt)(nxt)
            cur = nxt
        cur[_slot(cur, parts[-1], item, parts[:-1])] = value
    return obj


def parse_recipe(text: str, source: str = "<recipe>", path: Path | None = None,
                 overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Parse and validate recipe YAML; raise RecipeError naming source, line and field (or the
    ``--set`` that gave the bad value)."""
    try:
        node, obj = load_yaml(text)
    except yaml.YAMLError as exc:
        raise RecipeError(_yaml_message(exc, source, text)) from None
    if obj is None:
        obj = {}
    if not isinstance(obj, dict):
        raise RecipeError(f"{source}:1: a recipe must be a mapping of keys (seed, data, teacher, ...), got {type(obj).__name__}")
    obj = apply_overrides(obj, overrides, source)
    sets = [(item, _override_parts(item)[1]) for item in overrides]
    base_dir = Path(path).parent if path is not None else Path.cwd()
    try:
        recipe = Recipe.model_validate(obj, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise RecipeError(_explain(exc, obj, node, source, sets)) from None
    recipe._path = path
    # surrogatepass: a --set from a non-UTF-8 command line still hashes
    recipe._sha256 = hashlib.sha256((text + "\n".join(overrides)).encode("utf-8", "surrogatepass")).hexdigest()
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read and validate a recipe file, with optional ``key.path=value`` overrides."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # a folder, no permission, a NUL in the name
        raise RecipeError(f"{path}: cannot read recipe ({type(exc).__name__})") from None
    return parse_recipe(text, str(path), path, overrides)


def recipe_json_schema() -> dict:
    """The JSON Schema (draft 2020-12) of a recipe, from the pydantic models: what ``kdcli recipe
    schema`` prints, for editors (e.g. ``# yaml-language-server: $schema=recipe.schema.json``)."""

    schema = Recipe.model_json_schema(by_alias=True, mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"urn:kdcli:schema:recipe:{__version__}",
            "title": "kdcli recipe", **{k: v for k, v in schema.items() if k != "title"}}


def builtin_recipe_path(name: str = "quickstart") -> Path:
    """The path of a recipe shipped inside the package (``kdcli/recipes/NAME.yaml``)."""
    return Path(__file__).resolve().parent.parent / "recipes" / f"{name}.yaml"


def builtin_recipes() -> dict[str, str]:
    """The recipes shipped inside the package: name → the first sentence of its leading comment."""
    out = {}
    for path in sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml")):
        lines = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.startswith("#"):
                break
            lines.append(line.lstrip("# ").strip())
        text = " ".join(lines)
        first = re.split(r"(?<!\bal\.)(?<=[.!?])\s", text, maxsplit=1)[0]  # "et al." ends no sentence
        out[path.stem] = first if len(first) <= 120 else first[:119].rsplit(" ", 1)[0] + " …"
    return out

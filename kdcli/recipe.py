"""Recipes: the pydantic models of a kdcli recipe, and YAML loading with precise errors.

A recipe says where the data is, what the teacher is (or how to train one), what the student
is, which distillation losses and pruning criterion to use, the resource target and the accuracy
budget, and how to export. Unknown keys, wrong types and impossible values are errors that name
the file, the line and the field path::

    recipes/bad.yaml:12: prune.steps: Input should be greater than or equal to 1 (got 0)

Units: ``target.macs`` and ``target.params`` are fractions of the teacher's when <= 1, absolute
counts when > 1; ``target.max_accuracy_drop`` is a fraction (0.01 = one percentage point).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic_core import PydanticCustomError
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_validator)

from kdcli.data import DataSpec
from kdcli.ensembles.spec import DiversifiedSpec, SpecialistsSpec
from kdcli.errors import RecipeError
from kdcli.losses.spec import DEFAULT_LOSSES, LossSpec
from kdcli.train import TrainSpec


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelRef(Strict):
    """A model by name (built-in, ``package.module:factory`` or ``file.py:factory``) and args."""

    model: str
    model_args: dict[str, Any] = Field(default_factory=dict)


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
    model_args: dict[str, Any] = Field(default_factory=dict)
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
    kd_weight: float = Field(0.5, ge=0)
    temperature: float = Field(4.0, gt=0)


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
    importance: Literal["magnitude", "magnitude-l1", "taylor", "activation", "bn-scale"] = "magnitude"
    steps: int = Field(4, ge=1, le=100)
    max_retries: int = Field(2, ge=0, le=10)
    # a step may cost step_tolerance x target.max_accuracy_drop before later distillation recovers it
    step_tolerance: float = Field(2.0, ge=1, le=100)
    round_to: int | None = Field(None, ge=1)
    ignored_layers: list[str] = Field(default_factory=list)
    ratios_from: str | None = None  # analysis.json whose suggested ratios seed the first step
    score_batches: int = Field(4, ge=1)
    final_epochs: int = Field(0, ge=0)


class TargetSpec(Strict):
    macs: float | None = Field(None, gt=0)
    params: float | None = Field(None, gt=0)
    latency_ms: float | None = Field(None, gt=0)
    max_accuracy_drop: float = Field(0.01, ge=0, le=1)

    @model_validator(mode="after")
    def _fractions(self) -> "TargetSpec":
        for name in ("macs", "params"):
            v = getattr(self, name)
            if v is not None and v > 1 and v != int(v):
                raise ValueError(f"{name}: a fraction must be <= 1, an absolute count a whole number; got {v}")
        return self


class ExportSpec(Strict):
    enabled: bool = True
    opset: int = Field(18, ge=18, le=23)
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 64])
    fail_if: list[str] = Field(default_factory=list)
    latency_budget_s: float = Field(2.0, gt=0)

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, v):
        if not v or any(b < 1 for b in v):
            raise ValueError("batch sizes must be a non-empty list of positive integers")
        return v


class AnalyzeSpec(Strict):
    ratios: list[float] = Field(default_factory=lambda: [round(0.1 * i, 1) for i in range(1, 10)])
    target_macs: float = Field(0.5, gt=0, le=1)
    eval_samples: int = Field(1000, ge=1)
    critical_fraction: float = Field(0.1, gt=0, lt=1)

    @field_validator("ratios")
    @classmethod
    def _in_range(cls, v):
        if not v or any(not 0 <= r < 1 for r in v):
            raise ValueError("ratios must be in [0, 1)")
        return sorted(v)


class Recipe(Strict):
    seed: int = 0
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

    @model_validator(mode="after")
    def _ensemble_student(self) -> "Recipe":
        if isinstance(self.teacher, (SpecialistsSpec, DiversifiedSpec)) and self.student.model is None:
            raise PydanticCustomError("ensemble_student", "student.model: an ensemble teacher cannot be pruned "
                                      "into the student; declare the student's architecture (student: {model: ...})")
        if isinstance(self.teacher, (SpecialistsSpec, DiversifiedSpec)) and self.distill.train_teacher is not None:
            raise PydanticCustomError("ensemble_training", "distill.train_teacher: an ensemble teacher is not "
                                      "fine-tuned between steps; remove train_teacher or use a single teacher")
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
    import re

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")


def _line_of(node: yaml.Node | None, loc: tuple) -> int | None:
    """Line (1-based) of the YAML node at the pydantic error location ``loc``."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == key:
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _clean_loc(loc: tuple) -> tuple:
    # pydantic puts the union tag / validator names into loc (e.g. 'kd', 'function-after[...]').
    return tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in _TAGS)))


_TAGS = {"kd", "ce", "dkd", "hint", "at", "fsp", "ab", "vid", "str", "int", "float", "bool",
         "digits", "idx", "cifar10-bin", "image-folder", "tensors", "python",
         "list[str]", "dict[str,any]", "literal['pruned-teacher']", "none",
         "single-model", "specialists", "diversified"}


def apply_overrides(obj: dict, overrides: list[str] | tuple[str, ...], source: str) -> dict:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to a recipe mapping."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. prune.steps=2")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        cur = obj
        for part in parts[:-1]:
            nxt = cur.get(part)
            if nxt is None:
                nxt = cur[part] = {}
            elif isinstance(nxt, str) and part == "source":
                nxt = cur[part] = {"kind": nxt}
            if not isinstance(nxt, dict):
                raise RecipeError(f"--set {item!r}: {source}: {'.'.join(parts[:-1])} is not a mapping")
            cur = nxt
        cur[parts[-1]] = value
    return obj


def parse_recipe(text: str, source: str = "<recipe>", path: Path | None = None,
                 overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Parse and validate recipe YAML; raise RecipeError naming source, line and field."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        obj = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{where}: not valid YAML ({problem})") from None
    if obj is None:
        obj = {}
    if not isinstance(obj, dict):
        raise RecipeError(f"{source}:1: a recipe must be a mapping of keys (seed, data, teacher, ...), got {type(obj).__name__}")
    obj = apply_overrides(obj, overrides, source)
    try:
        recipe = Recipe.model_validate(obj)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = _clean_loc(tuple(err["loc"]))
        line = _line_of(node, loc)
        where = f"{source}:{line}" if line else source
        field = _format_loc(loc) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required field missing"
        got = err.get("input")
        # value_error messages come from our validators, which quote the value themselves
        suffix = (f" (got {got!r})" if err["type"] not in ("extra_forbidden", "missing", "value_error")
                  and not isinstance(got, dict | list) else "")
        more = f" [and {len(exc.errors()) - 1} more]" if len(exc.errors()) > 1 else ""
        raise RecipeError(f"{where}: {field}: {msg}{suffix}{more}") from None
    recipe._path = path
    recipe._sha256 = hashlib.sha256((text + "\n".join(overrides)).encode()).hexdigest()
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read and validate a recipe file, with optional ``key.path=value`` overrides."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except (IsADirectoryError, UnicodeDecodeError, PermissionError) as exc:
        raise RecipeError(f"{path}: cannot read recipe ({type(exc).__name__})") from None
    return parse_recipe(text, str(path), path, overrides)


def builtin_recipe_path(name: str = "quickstart") -> Path:
    """The path of a recipe shipped inside the package (``kdcli/recipes/NAME.yaml``)."""
    return Path(__file__).resolve().parent / "recipes" / f"{name}.yaml"

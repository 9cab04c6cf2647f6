"""Recipe specs of the distillation loss terms (``distill.losses`` in a recipe).

Each entry of ``distill.losses`` is one weighted term of the distillation objective, picked by
``kind``. The total loss is ``Σ weight_k · term_k``. Logit terms (kd, ce, dkd) need no layers;
feature terms (hint, at, fsp, ab, vid) name teacher and student layers by module path
(``model.get_submodule`` paths such as ``layer2`` or ``features.3``), ``auto`` (the output of
each top-level stage, see :func:`kdcli.distill.taps.auto_layers`) or ``auto-blocks`` (the output
of every block inside those stages, :func:`kdcli.distill.taps.block_layers`); a single path may
be given as a string::

    distill:
      losses:
        - {kind: kd, temperature: 4, weight: 0.9}
        - {kind: ce, weight: 0.1}
        - {kind: hint, teacher_layers: [layer2], student_layers: conv2, weight: 0.5}
        - {kind: vid, pairing: all-to-all, lambda: learned, weight: 0.1}

Safe defaults matter: Hinton KD multiplies its KL term by T², so T=20 with a teacher whose logits
spread over ~25 units gives gradients ~400× larger than cross-entropy's; with lr 0.1 that diverged
in a benchmark. The default recipe is T=4 with weights 0.9 (kd) / 0.1 (ce).

Each term is computed as its authors' code computes it, so the weights published with a method
transfer as they are. ``weight`` defaults to 1, except where that reduction makes the published
weight something else: ``at`` 1000 (Zagoruyko & Komodakis' β = 10³), ``ab`` 0.003 (Heo et al.'s
``/ 1000 * 3``). ``vid`` 1 is RepDistiller's published VID weight with cross-entropy weight 1.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

LayerSelection = Union[Literal["auto", "auto-blocks"], list[str]]

# Every loss kind a recipe may name, in the order of definition: the ``@_kind`` decorator below
# adds a spec class here, and ``LossSpec`` (the tagged union), ``FEATURE_KINDS`` and the error
# formatting's tag names are derived from it. A new loss is one class here, decorated, plus its
# term in kdcli/losses (a ``Term`` subclass declared with the same ``kind``).
LOSS_SPECS: list[type] = []


def _kind(cls):
    LOSS_SPECS.append(cls)
    return cls


class _Term(BaseModel):
    # allow_inf_nan=False: an inf or nan weight or temperature makes every loss nan
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    weight: float = Field(1.0, ge=0, le=1e6)


class _FeatureTerm(_Term):
    teacher_layers: LayerSelection = "auto"
    student_layers: LayerSelection = "auto"

    @field_validator("teacher_layers", "student_layers", mode="before")
    @classmethod
    def _one_path(cls, v):
        # ``student_layers: layer3`` means the one layer ``[layer3]``.
        return [v] if isinstance(v, str) and v not in ("auto", "auto-blocks") else v

    @field_validator("teacher_layers", "student_layers")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and (not v or any(not isinstance(s, str) or not s.strip() for s in v)):
            raise ValueError("expected 'auto', 'auto-blocks' or a non-empty list of module paths")
        return v


@_kind
class KD(_Term):
    """Hinton et al. 2015: T² · KL(softmax(t/T) || softmax(s/T))."""

    kind: Literal["kd"] = "kd"
    temperature: float = Field(4.0, gt=0, le=1000)


@_kind
class CE(_Term):
    """Cross-entropy of the student's logits with the hard labels (T = 1)."""

    kind: Literal["ce"] = "ce"
    label_smoothing: float = Field(0.0, ge=0, lt=1)


@_kind
class DKD(_Term):
    """Zhao et al. 2022 (decoupled KD): α·TCKD + β·NCKD, each scaled by T²."""

    kind: Literal["dkd"] = "dkd"
    alpha: float = Field(1.0, ge=0, le=1e4)
    beta: float = Field(8.0, ge=0, le=1e4)
    temperature: float = Field(4.0, gt=0, le=1000)


@_kind
class Hint(_FeatureTerm):
    """Romero et al. 2015 (FitNets): L2 between a regressor of the student's guided layer and the
    teacher's hint layer."""

    kind: Literal["hint"] = "hint"
    # Granularity-weighted matching: scale each teacher channel's term by the map's ``weight`` and
    # pool its ``critical`` channels (the map is ``distill.granularity``; uniform without one).
    granularity: bool = False


@_kind
class AT(_FeatureTerm):
    """Zagoruyko & Komodakis 2017: attention transfer with p-th power spatial attention maps.

    The term is the authors' ``Σ_j at_loss_j``, the mean squared difference of the normalised maps
    per layer pair (kdcli.distill.losses.maps.at_loss), so the default weight 1000 is their β = 10³
    (``--beta 1e+3``, szagoruyko/attention-transfer)."""

    kind: Literal["at"] = "at"
    weight: float = Field(1000.0, ge=0, le=1e6)
    p: float = Field(2.0, gt=0, le=16)  # |a|^p of activations overflows float32 far beyond


@_kind
class FSP(_FeatureTerm):
    """Yim et al. 2017: flow-of-solution-procedure matrices between consecutive tapped layers."""

    kind: Literal["fsp"] = "fsp"


@_kind
class AB(_FeatureTerm):
    """Heo et al. 2019: activation-boundary margin loss on pre-activation features.

    Per layer pair the squared L2 norm per sample, averaged over the batch; pairs weighted
    ``layer_decay^(L−1−k)`` (the deepest 1, halved per shallower pair by default). With the default
    weight 0.003 that is the authors' CIFAR objective, ``(ab_3 + ab_2/2 + ab_1/4) / 1000 * 3``
    (bhheo/AB_distillation; see kdcli.distill.losses.hints.ABTerm)."""

    kind: Literal["ab"] = "ab"
    weight: float = Field(0.003, ge=0, le=1e6)
    margin: float = Field(1.0, ge=0, le=1e4)
    layer_decay: float = Field(0.5, gt=0, le=1)  # 1: every layer pair counts the same


@_kind
class VID(_FeatureTerm):
    """Ahn et al. 2019: variational information distillation, −log q(t|s) with a Gaussian q,
    averaged over batch, channels and positions as in the reference code, so the default weight 1
    (with ``ce`` weight 1) is RepDistiller's published setting (``-b 1``)."""

    kind: Literal["vid"] = "vid"
    pairing: Literal["pairwise", "all-to-all"] = "pairwise"
    lambda_: Literal["uniform", "learned"] = Field("uniform", alias="lambda")
    init_var: float = Field(5.0, gt=0, le=1e6)
    eps: float = Field(1e-5, gt=0, le=1)
    granularity: bool = False

    # A field validator (pairing is validated first): the error then names distill.losses[i].lambda.
    @field_validator("lambda_")
    @classmethod
    def _learned_needs_all(cls, v: str, info: ValidationInfo) -> str:
        if v == "learned" and info.data.get("pairing", "all-to-all") != "all-to-all":
            raise ValueError("learned needs pairing: all-to-all (pairwise pairing fixes λ)")
        return v


LossSpec = Annotated[Union[tuple(LOSS_SPECS)], Field(discriminator="kind")]

LOSS_KINDS: tuple[str, ...] = tuple(get_args(c.model_fields["kind"].annotation)[0] for c in LOSS_SPECS)
FEATURE_KINDS: tuple[str, ...] = tuple(get_args(c.model_fields["kind"].annotation)[0] for c in LOSS_SPECS
                                       if issubclass(c, _FeatureTerm))

DEFAULT_LOSSES = [KD(temperature=4.0, weight=0.9), CE(weight=0.1)]

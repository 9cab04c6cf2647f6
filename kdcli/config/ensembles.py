"""Recipe models of ensemble teachers: ``teacher: {ensemble: specialists | diversified, ...}``.

Specialists (Hinton et al. 2015, section 5)::

    teacher:
      ensemble: specialists
      generalist: {model: cnn3, model_args: {widths: [16, 32, 64]}, train: {epochs: 8}}
      num_specialists: 3        # K-means clusters of the classes
      subset_size: 3            # classes per specialist (null: the clusters as K-means finds them)
      cluster_on: correlation   # K-means on correlation (default) or covariance columns
      top_n: 1                  # the generalist's top classes that activate specialists
      train: {epochs: 3, lr: 0.02}
      soft_target_weight: 1.0   # KL toward the generalist's soft targets (0: hard labels only)
      soft_target_temperature: 2.0
      inference_steps: 50       # gradient steps of the KL combination
      inference_lr: 1.0

``generalist`` may also be a bare path: ``generalist: runs/teacher.kdc``.

Diversified (the adaptive-granularity design)::

    teacher:
      ensemble: diversified
      members: 3
      model: mlp
      model_args: {hidden: [256]}
      train: {epochs: 5}
      diversity_weight: 1.0
      granularity: null         # null: computed from each predecessor; or a granularity.json

``TrainSpec`` is the training loop's (:mod:`kdcli.train.loop`), shared with :mod:`kdcli.config.recipe`.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator, model_validator

from kdcli.config.train import TrainSpec


class _Strict(BaseModel):
    # allow_inf_nan=False: no ensemble setting means anything at inf or nan
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


def _train(**kw):
    return lambda: TrainSpec(**kw)


# Specialists' soft-target regulariser (Hinton et al. 2015, §6.1): each specialist minimises
# CE(hard labels) + weight·T²·KL(generalist's soft targets ‖ specialist) at temperature T; see
# kdcli.ensembles.specialists.train_specialist. Shared with its keyword defaults.
SOFT_TARGET_WEIGHT = 1.0
SOFT_TARGET_TEMPERATURE = 2.0


class GeneralistSpec(_Strict):
    """The generalist of a specialist ensemble: ``checkpoint`` (a kdcli ``.kdc`` file, or a user
    checkpoint read with ``model``/``model_args``), or trained now from ``model`` with ``train``."""

    model: str | None = None
    model_args: dict[str, JsonValue] = Field(default_factory=dict)  # stored in the model file as JSON
    checkpoint: str | None = None
    train: TrainSpec = Field(default_factory=_train(epochs=20))

    @model_validator(mode="after")
    def _source(self) -> "GeneralistSpec":
        if self.model is None and self.checkpoint is None:
            raise ValueError("give model (to train a generalist) or checkpoint (a .kdc file, "
                             "or a user checkpoint together with model)")
        return self


class SpecialistsSpec(_Strict):
    """A generalist plus specialists on confusable class subsets (Hinton et al. 2015, §5)."""

    ensemble: Literal["specialists"]
    generalist: GeneralistSpec
    num_specialists: int = Field(2, ge=1, le=1000)
    subset_size: int | None = Field(None, ge=2, le=100_000)
    top_n: int = Field(1, ge=1, le=100_000)
    train: TrainSpec = Field(default_factory=_train(epochs=5, lr=0.02))
    # Soft targets of the generalist as a regulariser of each specialist (Hinton et al. 2015, §6.1):
    # the specialist's training set is small and enriched in its classes, so it overfits them.
    soft_target_weight: float = Field(SOFT_TARGET_WEIGHT, ge=0, le=1e4)
    soft_target_temperature: float = Field(SOFT_TARGET_TEMPERATURE, gt=0, le=100)
    inference_steps: int = Field(50, ge=0, le=10_000)
    inference_lr: float = Field(1.0, gt=0, le=100)
    cluster_samples: int = Field(10_000, ge=10, le=100_000_000)  # transfer-set samples that estimate the covariance
    cluster_on: Literal["correlation", "covariance"] = "correlation"  # see kdcli.ensembles.clusters

    @field_validator("generalist", mode="before")
    @classmethod
    def _path_shorthand(cls, v):
        return {"checkpoint": v} if isinstance(v, str) else v


class DiversifiedSpec(_Strict):
    """Members of one architecture trained in sequence, each with a granularity-weighted feature
    term against its predecessor (see :func:`kdcli.ensembles.diversified.diversification_term`)."""

    ensemble: Literal["diversified"]
    members: int = Field(3, ge=2, le=100)
    model: str
    model_args: dict[str, JsonValue] = Field(default_factory=dict)  # stored in the model file as JSON
    train: TrainSpec = Field(default_factory=_train(epochs=10))
    diversity_weight: float = Field(1.0, ge=0, le=1e4)
    layers: Union[Literal["auto"], list[str]] = "auto"
    granularity: str | None = None  # a granularity.json; null: computed from each predecessor
    critical_fraction: float = Field(0.25, gt=0, lt=1)
    sensitivity_samples: int = Field(1024, ge=16, le=10_000_000)

    @field_validator("layers")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and (not v or any(not isinstance(s, str) or not s.strip() for s in v)):
            raise ValueError("expected 'auto' or a non-empty list of module paths")
        return v


EnsembleSpec = Union[SpecialistsSpec, DiversifiedSpec]
ENSEMBLE_KINDS = ("specialists", "diversified")


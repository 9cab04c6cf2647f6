"""The recipe's schema, all of it, and its loading: torch-free, so that ``kdcli recipe validate``
and ``kdcli recipe schema`` answer without importing torch.

One module per section: :mod:`.data` (``data:``), :mod:`.train` (every ``train:``),
:mod:`.losses` (``distill.losses``), :mod:`.ensembles` (ensemble teachers) and :mod:`.recipe`
(the rest, the YAML loading with file:line:field errors, and the JSON Schema).
"""

from kdcli.config.data import AugmentSpec, DataSpec, NormalizeStats
from kdcli.config.losses import DEFAULT_LOSSES, FEATURE_KINDS, LossSpec
from kdcli.config.recipe import (AnalyzeSpec, Recipe, TargetSpec, builtin_recipe_path, check_device_string,
                                 load_recipe, parse_recipe)
from kdcli.config.train import TrainSpec

__all__ = ["AnalyzeSpec", "AugmentSpec", "DEFAULT_LOSSES", "DataSpec", "FEATURE_KINDS", "LossSpec", "NormalizeStats",
           "Recipe", "TargetSpec", "TrainSpec", "builtin_recipe_path", "check_device_string", "load_recipe",
           "parse_recipe"]

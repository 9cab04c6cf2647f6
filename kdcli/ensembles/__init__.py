"""Ensembles as teachers (issue 7): a stronger teacher than one model, distilled into one student.

- :mod:`kdcli.ensembles.specialists`: a generalist plus specialists on confusable class subsets,
  combined by KL minimisation (Hinton et al. 2015, §5); :mod:`~kdcli.ensembles.clusters` finds
  the subsets, :mod:`~kdcli.ensembles.combine` combines the distributions.
- :mod:`kdcli.ensembles.diversified`: members trained in sequence with a granularity-weighted
  feature term against the previous member; :mod:`~kdcli.ensembles.diversity` measures
  disagreement and linear CKA (Kornblith et al. 2019).
- :mod:`kdcli.config.ensembles`: the recipe models (``teacher: {ensemble: specialists | diversified}``);
  :mod:`kdcli.ensembles.build`: :func:`build_ensemble_teacher`, called by ``obtain_teacher``.

Both ensembles are ``nn.Module`` s whose ``forward(x)`` returns log-probabilities (logits up to a
constant), so distillation, evaluation and export treat them as any teacher.
"""

from __future__ import annotations

from kdcli.ensembles.build import build_ensemble_teacher
from kdcli.ensembles.clusters import ClassClusters, confusable_subsets, generalist_clusters
from kdcli.ensembles.combine import combine_distributions
from kdcli.ensembles.diversified import AveragedEnsemble, diversification_term, train_diversified
from kdcli.ensembles.diversity import disagreement_rate, ensemble_diversity, linear_cka
from kdcli.ensembles.specialists import (SpecialistEnsemble, dustbin_correction, specialist_from,
                                         train_specialist)

__all__ = ["build_ensemble_teacher", "ClassClusters", "confusable_subsets", "generalist_clusters",
           "combine_distributions", "AveragedEnsemble", "diversification_term", "train_diversified",
           "disagreement_rate", "ensemble_diversity", "linear_cka", "SpecialistEnsemble",
           "dustbin_correction", "specialist_from", "train_specialist"]

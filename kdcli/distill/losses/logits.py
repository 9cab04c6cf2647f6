"""Losses on the logits: Hinton KD, decoupled KD (DKD) and hard-label cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcli.distill.losses.base import Term


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. 2015: ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, mean over the batch.

    Logits are (N, K). The T² factor keeps the soft-target gradients at the scale of the
    hard-label ones as T grows (the gradient of the KL term scales as 1/T²). It also makes the
    term large for big T with confident teachers: T=20 with logits spread over ~25 units and lr 0.1
    diverged in a benchmark; T in 2..8 is the usual range.
    """
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
             alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> torch.Tensor:
    """Zhao et al. 2022, "Decoupled Knowledge Distillation", eq. 7: ``α·TCKD + β·NCKD``.

    TCKD is the KL between the binary (target class vs the rest) distributions of teacher and
    student; NCKD the KL between their distributions over the non-target classes only. Both at
    temperature T, scaled by T² and averaged over the batch, as in the authors' code. Logits
    (N, K), target (N,) int64. The authors' warm-up of the DKD weight is left to the schedule.
    """
    t = float(temperature)
    s, tl = student_logits.float() / t, teacher_logits.float() / t
    gt = F.one_hot(target, s.shape[1]).bool()
    p_s, p_t = F.softmax(s, dim=1), F.softmax(tl, dim=1)
    b_s = torch.stack([p_s[gt], 1 - p_s[gt]], dim=1).clamp_min(1e-12)
    b_t = torch.stack([p_t[gt], 1 - p_t[gt]], dim=1).clamp_min(1e-12)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(1).mean()
    # Mask the target class out with a large negative logit: its probability becomes exactly 0,
    # and kl_div's 0·log 0 = 0 keeps it out of the sum.
    log_q_s = F.log_softmax(s - 1000.0 * gt, dim=1)
    log_q_t = F.log_softmax(tl - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_q_s, log_q_t, reduction="batchmean", log_target=True)
    return (alpha * tckd + beta * nckd) * (t * t)


class KDTerm(Term, kind="kd"):
    """Hinton KD on the teacher's logits (see :func:`kd_loss`)."""

    def __init__(self, spec, name: str):
        super().__init__(name, spec.weight)
        self.temperature = spec.temperature

    def forward(self, s_logits, s_feats, targets, y):
        return kd_loss(s_logits, targets["logits"], self.temperature)


class DKDTerm(Term, kind="dkd"):
    """Decoupled KD (see :func:`dkd_loss`)."""

    def __init__(self, spec, name: str):
        super().__init__(name, spec.weight)
        self.alpha, self.beta, self.temperature = spec.alpha, spec.beta, spec.temperature

    def forward(self, s_logits, s_feats, targets, y):
        return dkd_loss(s_logits, targets["logits"], y, self.alpha, self.beta, self.temperature)


class CETerm(Term, kind="ce"):
    """Cross-entropy with the hard labels at T = 1 (the "student loss" of Hinton et al. 2015)."""

    def __init__(self, spec, name: str):
        super().__init__(name, spec.weight)
        self.label_smoothing = spec.label_smoothing

    def forward(self, s_logits, s_feats, targets, y):
        return F.cross_entropy(s_logits.float(), y, label_smoothing=self.label_smoothing)

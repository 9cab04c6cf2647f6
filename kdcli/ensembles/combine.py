"""Combining a generalist with its specialists (Hinton et al. 2015, §5.4).

For one input, with ``p^g`` the generalist's distribution over the K classes and, for each active
specialist m, ``p^m`` its distribution over its subset S_m plus a dustbin class, find the full
distribution ``q = softmax(z)`` that minimises

    L(z) = KL(p^g ‖ q) + Σ_m KL(p^m ‖ q^m),

where ``q^m`` is q seen by specialist m: ``q_j`` for j in S_m and, for its dustbin, the sum of
q over the classes outside S_m. The gradient is closed-form (no autograd, so it also runs under
``torch.no_grad`` and exports to ONNX as plain tensor ops):

    ∂/∂z_j KL(p^g ‖ q)   = q_j − p^g_j
    ∂/∂z_j KL(p^m ‖ q^m) = q_j − p^m_j                    for j ∈ S_m
                         = q_j · (1 − p^m_dust / q^m_dust)  for j ∉ S_m

A fixed number of gradient steps on z, batched over samples, starts from ``z = log p^g``. Each
step divides the gradient by the number of active terms (1 + active specialists), so that one
``lr`` suits any number of them (the Hessian of each term has eigenvalues in [0, 1]).
"""

from __future__ import annotations

import torch

_EPS = 1e-12


def expand_specialist(log_probs: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """A specialist's distribution over its subset plus dustbin, ``log_probs`` [N, |S|+1], laid
    out over all K classes: entry j is p^m_j for j in S, the dustbin probability for j not in S.
    ``columns`` [K] int64 maps each class to its output (|S| for the dustbin). Returns [N, K]."""
    return log_probs.exp().index_select(1, columns)


def combine_gradient(z: torch.Tensor, p_g: torch.Tensor, p_m: torch.Tensor, member: torch.Tensor,
                     active: torch.Tensor) -> torch.Tensor:
    """∂L/∂z (module docstring) for logits ``z`` [N, K], ``p_g`` [N, K], expanded specialist
    distributions ``p_m`` [N, M, K] (:func:`expand_specialist`), ``member`` [M, K] (1 where class
    j is in S_m) and ``active`` [N, M] (1 where specialist m takes part for sample n)."""
    q = torch.softmax(z, dim=1)
    grad = q - p_g
    if p_m.shape[1] == 0:
        return grad
    qm = q[:, None, :]                                           # [N, 1, K]
    outside = 1.0 - member                                       # [M, K]
    q_dust = (qm * outside).sum(-1, keepdim=True).clamp_min(_EPS)  # [N, M, 1]
    g_m = member * (qm - p_m) + outside * qm * (1.0 - p_m / q_dust)
    return grad + (active[..., None] * g_m).sum(1)


def combine_distributions(p_g: torch.Tensor, p_m: torch.Tensor, member: torch.Tensor, active: torch.Tensor,
                          *, steps: int = 50, lr: float = 1.0, init: torch.Tensor | None = None) -> torch.Tensor:
    """log q [N, K] for the q = softmax(z) that minimises KL(p^g ‖ q) + Σ_m active·KL(p^m ‖ q^m),
    after ``steps`` gradient steps of size ``lr`` on z (Hinton et al. 2015, §5.4); shapes as in
    :func:`combine_gradient`. ``init`` (logits [N, K]) defaults to log p^g."""
    member = member.to(p_g.dtype)
    active = active.to(p_g.dtype)
    z = p_g.clamp_min(_EPS).log() if init is None else init.to(p_g.dtype)
    terms = 1.0 + active.sum(1, keepdim=True)                    # [N, 1]
    for _ in range(int(steps)):
        z = z - lr * combine_gradient(z, p_g, p_m, member, active) / terms
    return torch.log_softmax(z, dim=1)


def combine_objective(z: torch.Tensor, p_g: torch.Tensor, p_m: torch.Tensor, member: torch.Tensor,
                      active: torch.Tensor) -> torch.Tensor:
    """L(z) per sample [N] (for tests and diagnostics); shapes as in :func:`combine_gradient`."""
    log_q = torch.log_softmax(z, dim=1)
    kl = lambda p, log_r: (p * (p.clamp_min(_EPS).log() - log_r)).sum(-1)  # noqa: E731
    total = kl(p_g, log_q)
    if p_m.shape[1] == 0:
        return total
    member = member.to(z.dtype)
    q = log_q.exp()[:, None, :]
    q_dust = (q * (1 - member)).sum(-1)                                   # [N, M]
    # p^m and q^m over S_m ∪ {dustbin}: subset entries, then the dustbin once
    p_dust = (p_m * (1 - member)).amax(-1)                                # every outside entry holds it
    log_qm = torch.where(member.bool(), log_q[:, None, :], torch.zeros_like(p_m))
    kl_sub = (member * p_m * (p_m.clamp_min(_EPS).log() - log_qm)).sum(-1)
    kl_dust = p_dust * (p_dust.clamp_min(_EPS).log() - q_dust.clamp_min(_EPS).log())
    return total + (active * (kl_sub + kl_dust)).sum(1)

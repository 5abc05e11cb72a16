"""The power step of every Python power loop of the package, written once, with the operator
given as two functions (``apply: v -> A v``, ``adjoint: t -> A^T t``).

One step, the same sequence as the compiled kernels: ``t = A v``, ``a = A^T t``, then
``u <- t / |t|``, ``v <- a / |a|`` and the estimate ``|a| / |t|`` (``u^T A v`` at the new
vectors). Conventions: where ``|t|`` or ``|a|`` is 0 (a zero map) the vectors stay as they
were and the estimate is 0; the choice of what a non-finite value does is the caller's
(``finite=True``: a step with a non-finite norm is skipped like a zero one; ``rollback=True``:
a non-finite norm met in any step restores the vectors of the call's start and gives a NaN
estimate). Everything with ``torch.where``: no host synchronization, except the ``tol`` test.

Used by the reference kernels of ``power_step_``, ``lowrank_power_step_`` (the low-rank maps
of :mod:`specreg_fast.dense`) and ``conv_power_step_`` (:mod:`specreg_fast.ops`), and (the
normalization only: the sum over ranks sits between the two products) the sharded step of
:mod:`specreg_fast.distributed`. ``reference.py`` keeps its own loops: it is the ground truth.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["normalize_", "power_iterate"]


def normalize_(t: torch.Tensor, a: torch.Tensor, u: torch.Tensor, v: torch.Tensor, finite: bool = False):
    """The second half of a step, in place on ``u``/``v`` (shaped like ``t``/``a``):
    ``u <- t / |t|``, ``v <- a / |a|`` where both norms are > 0 (and finite, with ``finite``),
    else unchanged. Returns ``(est, |t|, |a|)`` with ``est = |a| / |t|`` there, else 0."""
    tn = torch.linalg.vector_norm(t)
    an = torch.linalg.vector_norm(a)
    ok = (tn > 0) & (an > 0)
    if finite:
        ok = ok & torch.isfinite(tn) & torch.isfinite(an)
    u.copy_(torch.where(ok, t / tn, u))
    v.copy_(torch.where(ok, a / an, v))
    return torch.where(ok, an / tn, torch.zeros_like(an)), tn, an


def power_iterate(apply: Callable[[torch.Tensor], torch.Tensor], adjoint: Callable[[torch.Tensor], torch.Tensor],
                  u: torch.Tensor, v: torch.Tensor, n_iter: int, tol: float = 0.0, *, finite: bool = False,
                  rollback: bool = False) -> torch.Tensor:
    """At most ``n_iter`` power steps in place on ``u``/``v``; returns the last step's estimate
    (0-d, ``u``'s dtype; 0 when ``n_iter`` is 0). With ``tol > 0`` it stops after a step whose
    estimate moved by at most ``tol`` times itself. ``finite`` and ``rollback``: the module
    docstring. Call under ``torch.no_grad()``."""
    if rollback:
        u0, v0 = u.clone(), v.clone()
        bad = torch.zeros((), dtype=torch.bool, device=u.device)
    est = torch.zeros((), dtype=u.dtype, device=u.device)
    prev = None
    for _ in range(n_iter):
        t = apply(v)
        a = adjoint(t)
        est, tn, an = normalize_(t, a, u, v, finite)
        if rollback:
            bad = bad | ~torch.isfinite(tn) | ~torch.isfinite(an)
        if tol > 0 and prev is not None and bool(torch.abs(est - prev) <= tol * est):
            break
        prev = est
    if rollback:
        u.copy_(torch.where(bad, u0, u))
        v.copy_(torch.where(bad, v0, v))
        est = torch.where(bad, torch.full_like(est, math.nan), est)
    return est

"""Spectral norms of dense weights: a grouped, differentiable power iteration.

``spectral_norms`` runs the no-grad power step on a whole list of weights in one op call
(``specreg_fast::power_step_``) and then returns ``u^T W v`` through the functional
``specreg_fast::sigma`` op, whose backward is ``u v^T``: no autograd graph through the
iterations.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from . import backends, ops

__all__ = ["PowerState", "init_power_state", "spectral_norms", "spectral_norm", "as_matrix"]


def as_matrix(W: torch.Tensor) -> torch.Tensor:
    """A weight as the 2-D matrix whose norm is taken: ``(out, -1)``. For a conv kernel this
    is the reshaped-kernel *matrix* norm, not the conv operator norm."""
    if W.dim() < 2:
        raise ValueError(f"a weight needs at least 2 dims, got shape {tuple(W.shape)}")
    return W if W.dim() == 2 else W.reshape(W.shape[0], -1)


@dataclass
class PowerState:
    """Persistent left/right vectors of each layer (float32, or float64 for float64 weights)."""

    us: List[torch.Tensor] = field(default_factory=list)
    vs: List[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.us)


def init_power_state(weights: Sequence[torch.Tensor], generator: Optional[torch.Generator] = None) -> PowerState:
    """Random unit vectors for each 2-D weight (u from W v, so only v is random)."""
    us, vs = [], []
    for W in weights:
        W = as_matrix(W)
        acc = ops._acc_dtype(W.dtype)
        v = torch.randn(W.shape[1], dtype=acc, generator=generator).to(W.device)
        v = v / torch.linalg.vector_norm(v).clamp_min(torch.finfo(acc).tiny)
        u = torch.zeros(W.shape[0], dtype=acc, device=W.device)
        if W.shape[0]:
            u[0] = 1.0
        us.append(u)
        vs.append(v)
    return PowerState(us, vs)


def _validate(weights: Sequence[torch.Tensor], state: PowerState, names: Optional[Sequence[str]] = None) -> None:
    if len(state.us) != len(weights) or len(state.vs) != len(weights):
        raise ValueError(f"state: expected {len(weights)} (u, v) pairs, one per weight, got "
                         f"{len(state.us)} u and {len(state.vs)} v")
    for l, W in enumerate(weights):
        name = names[l] if names is not None else f"weights[{l}]"
        if not isinstance(W, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(W).__name__}")
        if W.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D weight, got shape {tuple(W.shape)}")
        if W.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise TypeError(f"{name}: expected a float32/float64/bfloat16/float16 weight, got {W.dtype}")
        acc = ops._acc_dtype(W.dtype)
        for vec, what, size in ((state.us[l], "u", W.shape[0]), (state.vs[l], "v", W.shape[1])):
            if not isinstance(vec, torch.Tensor):
                raise TypeError(f"{name}: state {what} must be a tensor, got {type(vec).__name__}")
            if vec.shape != (size,):
                raise ValueError(f"{name}: state {what} must have shape ({size},) for a weight of shape "
                                 f"{tuple(W.shape)}, got {tuple(vec.shape)}")
            if vec.dtype != acc:
                raise ValueError(f"{name}: state {what} must be {acc} for a {W.dtype} weight, got {vec.dtype}")
            if vec.device != W.device:
                raise ValueError(f"{name}: state {what} is on {vec.device} but the weight is on {W.device}")
            if not vec.is_contiguous():
                raise ValueError(f"{name}: state {what} must be contiguous")
    ops.check_disjoint_state((f"{names[l] if names is not None else f'weights[{l}]'}: state {what}", vec)
                             for what, vecs in (("u", state.us), ("v", state.vs)) for l, vec in enumerate(vecs))


def spectral_norms(weights: Sequence[torch.Tensor], state: PowerState, n_iter: int = 1, tol: Optional[float] = None,
                   max_iter: Optional[int] = None, *, update: bool = True,
                   names: Optional[Sequence[str]] = None, backend: str = "auto") -> torch.Tensor:
    """sigma_max estimates of every 2-D weight in ``weights``, differentiable.

    Runs ``n_iter`` power steps (or, with ``tol``, until each layer's estimate changes by at
    most ``tol`` relative, at most ``max_iter`` steps, default 100; both counts at most
    ``specreg_fast.ops.MAX_ITER``, and Ctrl-C stops the loop) on all weights in one
    op call, updating ``state`` in place, then returns ``sigma_l = u_l^T W_l v_l`` as a 1-D
    tensor (float32; float64 if any weight is float64). The gradient w.r.t. ``W_l`` is
    ``u_l v_l^T``: exact for the bilinear form, and d sigma_max/dW once converged.
    ``update=False`` evaluates at the current vectors without moving them.

    ``backend`` picks the power-step kernel: ``"auto"`` | ``"cpp"`` | ``"cuda"`` | ``"triton"``
    | ``"reference"`` (order and meaning: ``specreg_fast.backends``); the differentiable
    ``sigma`` at the end always goes through the dispatcher.

    Invalid input raises before anything is modified.
    """
    weights = list(weights)
    n_iter = ops._iter_arg("spectral_norms", "n_iter", n_iter)
    if tol is not None:
        tol = ops._tol_arg("spectral_norms", tol, finite=False)
    if max_iter is not None:
        max_iter = ops._iter_arg("spectral_norms", "max_iter", max_iter, minimum=1)
    _validate(weights, state, names)
    if backend != "auto":
        backends.resolve(backend, weights[0].device if weights else torch.device("cpu"))  # bad name: raise now
    if update:
        steps = n_iter if tol is None else (max_iter if max_iter is not None else 100)
        with torch.no_grad():
            detached = [W.detach() for W in weights]
            if backend == "auto":
                # the dispatcher already picks in the documented order (compiled kernel of the
                # device, else Triton on CUDA, else the reference), and torch.compile traces it
                est = ops.power_step_(detached, state.us, state.vs, steps, 0.0 if tol is None else tol)
            else:
                est = backends.power_step_(detached, state.us, state.vs, steps, 0.0 if tol is None else tol,
                                           backend=backend)
        if steps >= 1 and all(W.device.type == "cpu" for W in weights):
            # The step's estimate |W^T u| is u^T W v at the new vectors (to float rounding):
            # take the value from it instead of reading every W a second time.
            return ops.sigma_from_step(weights, state.us, state.vs, est)
    return ops.sigma(weights, state.us, state.vs)


def spectral_norm(W: torch.Tensor, tol: float = 1e-6, max_iter: int = 1000, seed: int = 0) -> torch.Tensor:
    """Stateless sigma_max of one weight (conv kernels as their ``(out, -1)`` matrix), by
    power iteration from a seeded random start until the relative change is below ``tol``
    (at most ``max_iter <= specreg_fast.ops.MAX_ITER`` steps); differentiable (gradient
    ``u v^T``)."""
    M = as_matrix(W)
    g = torch.Generator().manual_seed(seed)
    state = init_power_state([M], generator=g)
    return spectral_norms([M], state, tol=tol, max_iter=max_iter)[0]

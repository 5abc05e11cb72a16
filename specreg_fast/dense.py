"""Spectral norms of dense weights: a grouped, differentiable power iteration.

``spectral_norms`` runs the no-grad power step on a whole list of weights in one op call
(``specreg_fast::power_step_``) and then returns ``u^T W v`` through the functional
``specreg_fast::sigma`` op, whose backward is ``u v^T``: no autograd graph through the
iterations. ``lowrank_sigmas`` does the same for maps kept as factors, ``W + sum_k s_k B_k A_k``
(LoRA), without building the matrix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from . import backends, ops
from .contract import WEIGHT_DTYPES, acc_dtype, out_dtype

__all__ = ["PowerState", "init_power_state", "spectral_norms", "spectral_norm", "as_matrix", "lowrank_sigmas",
           "lowrank_grads", "validate_state", "step_sigmas"]


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
        acc = acc_dtype(W.dtype)
        v = torch.randn(W.shape[1], dtype=acc, generator=generator).to(W.device)
        v = v / torch.linalg.vector_norm(v).clamp_min(torch.finfo(acc).tiny)
        u = torch.zeros(W.shape[0], dtype=acc, device=W.device)
        if W.shape[0]:
            u[0] = 1.0
        us.append(u)
        vs.append(v)
    return PowerState(us, vs)


def validate_state(weights: Sequence[torch.Tensor], state: PowerState, names: Optional[Sequence[str]] = None) -> None:
    """The checks of :func:`spectral_norms` on its weights and state (errors name the layer,
    ``names[l]``, else ``weights[l]``): 2-D float weights, one contiguous ``u``/``v`` of the
    right size, accumulation dtype and device per weight, no two vectors sharing memory."""
    if len(state.us) != len(weights) or len(state.vs) != len(weights):
        raise ValueError(f"state: expected {len(weights)} (u, v) pairs, one per weight, got "
                         f"{len(state.us)} u and {len(state.vs)} v")
    for l, W in enumerate(weights):
        name = names[l] if names is not None else f"weights[{l}]"
        if not isinstance(W, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(W).__name__}")
        if W.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D weight, got shape {tuple(W.shape)}")
        if W.dtype not in WEIGHT_DTYPES:
            raise TypeError(f"{name}: expected a float32/float64/bfloat16/float16 weight, got {W.dtype}")
        acc = acc_dtype(W.dtype)
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
    n_iter = ops.iter_arg("spectral_norms", "n_iter", n_iter)
    if tol is not None:
        tol = ops.tol_arg("spectral_norms", tol, finite=False)
    if max_iter is not None:
        max_iter = ops.iter_arg("spectral_norms", "max_iter", max_iter, minimum=1)
    validate_state(weights, state, names)
    if backend != "auto":
        backends.resolve(backend, weights[0].device if weights else torch.device("cpu"))  # bad name: raise now
    steps = n_iter if tol is None else (max_iter if max_iter is not None else 100)
    return step_sigmas(weights, state, steps, update, 0.0 if tol is None else tol, backend)


def step_sigmas(weights: List[torch.Tensor], state: PowerState, n_iter: int, update: bool, tol: float = 0.0,
                backend: str = "auto", from_step=ops.sigma_from_step) -> torch.Tensor:
    """The body of :func:`spectral_norms` on arguments checked by :func:`validate_state`:
    ``n_iter`` power steps (``update``), then the sigmas; ``from_step(weights, us, vs, est)``
    makes them from the step's estimates (default ``ops.sigma_from_step``; the penalty routes
    the gradient per parameter instead)."""
    if update:
        with torch.no_grad():
            detached = [W.detach() for W in weights]
            if backend == "auto":
                # the dispatcher already picks in the documented order (compiled kernel of the
                # device, else Triton on CUDA, else the reference), and torch.compile traces it
                est = ops.power_step_(detached, state.us, state.vs, n_iter, tol)
            else:
                est = backends.power_step_(detached, state.us, state.vs, n_iter, tol, backend=backend)
        if n_iter >= 1 and all(W.device.type == "cpu" for W in weights):
            # The step's estimate |W^T u| is u^T W v at the new vectors (to float rounding):
            # take the value from it instead of reading every W a second time.
            return from_step(weights, state.us, state.vs, est)
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


# ---------------------------------------------------------------------- low-rank maps
# A map M = W + sum_k s_k B_k A_k (specreg_fast.layers.LowRank: a LoRA layer's W, B, A) is
# applied as W x + sum_k s_k B_k (A_k x) and its adjoint as W^T y + sum_k s_k A_k^T (B_k^T y),
# never built. The power steps of every map of a call run in one op call,
# ``specreg_fast::lowrank_power_step_`` (csrc/cpu/lowrank_step_cpu.cpp), whose CPU kernel reads
# each W once per step; it takes one (A, B, s) per map, so a map with several adapters is handed
# over with its adapters stacked, [A_1; A_2], [s_1 B_1, s_2 B_2], s = 1 (a copy of r (m + n)
# values, not of W), and one with none with empty factors.

def _mv(M: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``M @ x`` in ``x``'s (accumulation) dtype. A lower-precision ``M`` (a bfloat16 base
    weight) is applied in its own dtype to ``x`` rounded to it, without a copy of ``M``: the
    products round as in the layer's own forward."""
    if M.dtype == x.dtype:
        return torch.mv(M, x)
    return torch.mv(M, x.to(M.dtype)).to(x.dtype)


def lowrank_op_args(M) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """``(W, A, B, s)`` with ``W + s B A`` equal to the map ``M`` (detached): the one adapter
    as it is, several stacked (``s = 1``, the scales folded into ``B``), none as empty factors
    (``s = 0``), in the dtype the map promotes to (so its accumulation dtype is kept)."""
    W = M.base_matrix.detach()
    if len(M.As) == 1:
        return W, M.As[0].detach(), M.Bs[0].detach(), float(M.scales[0])
    if not M.As:
        return W, W.new_zeros((0, W.shape[1])), W.new_zeros((W.shape[0], 0)), 0.0
    dt = M.dtype
    A = torch.cat([A.detach().to(dt) for A in M.As], dim=0)
    B = torch.cat([B.detach().to(dt) * s for B, s in zip(M.Bs, M.scales)], dim=1)
    return W, A, B, 1.0


def _lowrank_power_step_(maps, us: List[torch.Tensor], vs: List[torch.Tensor], n_iter: int) -> torch.Tensor:
    """``n_iter`` power steps on every low-rank map in one ``lowrank_power_step_`` call, in
    place on ``us``/``vs`` (``n_iter = 0``: ``u^T M v`` at the current vectors), with the
    ``power_step_`` op's conventions: the estimate is ``|M^T t| / |t|`` (``u^T M v`` at the new
    vectors), a zero map keeps the vectors (estimate 0), and a step that meets a non-finite
    value leaves them as they were and gives NaN."""
    args = [lowrank_op_args(M) for M in maps]
    Ws, As, Bs, ss = (list(x) for x in zip(*args))
    return ops.lowrank_power_step_(Ws, As, Bs, ss, us, vs, n_iter, 0.0)


def lowrank_grads(M, u: torch.Tensor, v: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(param, left, right)`` with ``d(u^T M v)/d param = left right^T``, for the tensors of
    the low-rank map ``M`` that require grad: ``u v^T`` for ``W`` (``v u^T`` for a transposed
    base, as stored), ``s u (A v)^T`` for ``B`` and ``s (B^T u) v^T`` for ``A``. Vectors in
    ``u``'s dtype; call under no_grad."""
    out = []
    if M.base.requires_grad:
        out.append((M.base, v, u) if M.transposed else (M.base, u, v))
    for B, A, s in zip(M.Bs, M.As, M.scales):
        if B.requires_grad:
            out.append((B, u * s, _mv(A, v)))
        if A.requires_grad:
            out.append((A, _mv(B.t(), u) * s, v))
    return out


class _LowRankSigma(torch.autograd.Function):
    """``value`` (the maps' ``u^T M v``, computed without grad) with the backward of the
    bilinear form: ``grad[l] * left right^T`` into each factor, from :func:`lowrank_grads`."""

    @staticmethod
    def forward(ctx, value, owners, lefts, rights, *params):
        # lefts/rights: fresh tensors or copies of the vectors (the next step rewrites those in
        # place), so two calls before one backward each keep their own (as ops.sigma does)
        ctx.owners = owners
        ctx.dtypes = [p.dtype for p in params]
        ctx.save_for_backward(*lefts, *rights)
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        n = len(ctx.owners)
        grads = [ops.rank1_grad(saved[k], saved[n + k], grad[l], ctx.dtypes[k]) for k, l in enumerate(ctx.owners)]
        return (None, None, None, None, *grads)


def lowrank_sigmas(maps, us: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], n_iter: int = 1, *,
                   update: bool = True, validate: bool = True) -> torch.Tensor:
    """sigma_max estimates of low-rank maps (``specreg_fast.layers.LowRank``), differentiable
    in their factors, the matrices never built.

    Runs ``n_iter`` power steps (``update=False`` or ``n_iter=0``: none) in place on the
    persistent ``us``/``vs`` (validated as for :func:`spectral_norms`, against each map's
    shape and dtype) and returns ``u^T M v`` per map (float32; float64 if any map is float64),
    whose gradient is that of the bilinear form (:func:`lowrank_grads`), the exact
    d sigma_max once converged. Invalid input raises before anything is modified.
    ``validate=False`` skips the checks, for a caller that made them with
    :func:`validate_state` (the penalty, once per plan)."""
    maps, us, vs = list(maps), list(us), list(vs)
    if validate:
        n_iter = ops.iter_arg("lowrank_sigmas", "n_iter", n_iter)
        validate_state([M.like() for M in maps], PowerState(us, vs))
    dt = out_dtype([M.like() for M in maps])
    if not maps:
        return torch.zeros(0, dtype=dt)
    with torch.no_grad():
        value = _lowrank_power_step_(maps, us, vs, n_iter if update else 0).to(dt)
    if not torch.is_grad_enabled():
        return value
    with torch.no_grad():
        owners, lefts, rights, params = [], [], [], []
        for l, (M, u, v) in enumerate(zip(maps, us, vs)):
            for p, left, right in lowrank_grads(M, u.clone(), v.clone()):
                owners.append(l)
                lefts.append(left)
                rights.append(right)
                params.append(p)
    if not params:
        return value
    return _LowRankSigma.apply(value, owners, lefts, rights, *params)

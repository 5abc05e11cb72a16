"""Custom-op front: typed wrappers around ``torch.ops.specreg_fast.*``.

The schemas are declared once, in ``csrc/specreg_fast.cpp``. This module adds what the
C++ side cannot: fake (meta) implementations for ``torch.compile``, the autograd formula of
the functional ``sigma`` op, and the plain-PyTorch reference registered under
``CompositeExplicitAutograd`` so that a device with no kernel of its own (a CUDA tensor in a
CPU-only build, MPS, ...) still runs. If the compiled extension cannot be loaded, the same
schemas are defined here and only the reference runs (``HAS_CPP_EXT = False``).
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import List, Sequence

import torch

__all__ = ["power_step_", "sigma", "sigma_from_step", "conv_power_step_", "conv_sigma", "conv_adjoint",
           "conv_weight_grad", "conv_weight_grad_add_", "conv_sigma_from_step", "circular_power_step_", "batched_power_step_", "shifted_cholesky_info", "pack_conv_params", "HAS_CPP_EXT", "HAS_CONV_EXT", "SCHEMAS"]

# Kept identical to csrc/specreg_fast.cpp (a test compares them): used only when the
# compiled library is missing.
SCHEMAS = {
    "power_step_": "power_step_(Tensor[] weights, Tensor(a!)[] us, Tensor(b!)[] vs, int n_iter, float tol) -> Tensor",
    "sigma": "sigma(Tensor[] weights, Tensor[] us, Tensor[] vs) -> Tensor",
    "sigma_from_step": "sigma_from_step(Tensor[] weights, Tensor[] us, Tensor[] vs, Tensor est) -> Tensor",
    "conv_power_step_": "conv_power_step_(Tensor[] weights, Tensor(a!)[] xs, Tensor(b!)[] ys, int[] params, "
                        "str[] padding_modes, int n_iter, float tol) -> Tensor",
    "conv_sigma": "conv_sigma(Tensor[] weights, Tensor[] xs, Tensor[] ys, int[] params, str[] padding_modes) -> Tensor",
    "conv_adjoint": "conv_adjoint(Tensor[] weights, Tensor[] xs, Tensor[] ys, int[] params, str[] padding_modes) "
                    "-> Tensor[]",
    "conv_weight_grad": "conv_weight_grad(Tensor[] weights, Tensor[] xs, Tensor[] ys, int[] params, "
                        "str[] padding_modes) -> Tensor[]",
    "conv_weight_grad_add_": "conv_weight_grad_add_(Tensor(a!)[] grads, Tensor[] weights, Tensor[] xs, Tensor[] ys, "
                             "int[] params, str[] padding_modes) -> ()",
    "conv_sigma_from_step": "conv_sigma_from_step(Tensor[] weights, Tensor[] xs, Tensor[] ys, int[] params, "
                            "str[] padding_modes, Tensor est) -> Tensor",
    "circular_power_step_": "circular_power_step_(Tensor[] weights, Tensor(a!)[] xs, Tensor(b!)[] x_tops, "
                            "Tensor(c!)[] y_tops, int[] params, int n_iter) -> Tensor",
    "batched_power_step_": "batched_power_step_(Tensor blocks, Tensor(a!) us, Tensor(b!) vs, int n_iter) -> Tensor",
    "shifted_cholesky_info": "shifted_cholesky_info(Tensor H, Tensor shift) -> Tensor",
}

# The most power-iteration steps one op call may run (n_iter of every op, max_iter of the
# public functions): the same number as kMaxIter in csrc/op_contracts.h (a test compares them).
# 10^6 steps are minutes on a 1024 x 1024 weight; a larger count is a bug, not a budget.
MAX_ITER = 1_000_000

def _load(name: str):
    """Import the compiled library ``specreg_fast.<name>`` (its static initializers register
    kernels); the ImportError on failure, else None."""
    import importlib

    try:
        importlib.import_module(f"{__package__}.{name}")
        return None
    except ImportError as err:  # ABI mismatch, or built without it
        return err


def _cuda_major(version) -> "int | None":
    return int(str(version).split(".")[0]) if version else None


# specreg_fast._C: the schemas and the CPU kernels on the LibTorch stable ABI (one binary for
# every torch from the floor on); _C_conv: the CPU conv kernels (ATen's C++ API: the torch they
# were built with only); _C_cuda: the CUDA kernels, loaded only on a torch of the CUDA major they
# were built for. What does not load leaves its ops to the reference (or Triton, on a GPU).
_err = _load("_C")
HAS_CPP_EXT = _err is None
HAS_CONV_EXT = False
#: The CUDA major specreg_fast._C_cuda was built for (None: built without it).
BUILT_CUDA = None
if HAS_CPP_EXT:
    try:
        from ._build_info import CUDA_VERSION as BUILT_CUDA
    except ImportError:
        BUILT_CUDA = None
    try:  # the torch _C_conv and _C_cuda were built with: ATen's C++ API ties them to its minor
        from ._build_info import TORCH_VERSION as _BUILT_TORCH
    except ImportError:
        _BUILT_TORCH = None
    _same_minor = _BUILT_TORCH is None or torch.__version__.split("+")[0].split(".")[:2] == _BUILT_TORCH.split(".")[:2]
    _conv_err = _load("_C_conv") if _same_minor else f"built for torch {_BUILT_TORCH}, this is {torch.__version__}"
    HAS_CONV_EXT = _conv_err is None
    if not HAS_CONV_EXT:
        warnings.warn(f"specreg_fast: the CPU conv kernels were not loaded ({_conv_err}); the conv ops use the "
                      f"pure-PyTorch reference on CPU (the dense ops keep their kernels)", RuntimeWarning, stacklevel=2)
    if BUILT_CUDA is not None and torch.version.cuda is not None:
        if _cuda_major(BUILT_CUDA) != _cuda_major(torch.version.cuda):
            warnings.warn(f"specreg_fast: the CUDA kernels were built for CUDA {BUILT_CUDA}, torch has CUDA "
                          f"{torch.version.cuda}: not loaded; on a GPU the ops use Triton or the reference (the CPU "
                          f"kernels are loaded)", RuntimeWarning, stacklevel=2)
        else:
            _cuda_err = _load("_C_cuda") if _same_minor else f"built for torch {_BUILT_TORCH}"
            if _cuda_err is not None:
                warnings.warn(f"specreg_fast: the CUDA kernels were not loaded ({_cuda_err}); on a GPU the ops use "
                              f"Triton or the reference", RuntimeWarning, stacklevel=2)
else:
    warnings.warn(f"specreg_fast: compiled extension not loaded ({_err}); using the pure-PyTorch reference",
                  RuntimeWarning, stacklevel=2)
    _fallback_lib = torch.library.Library("specreg_fast", "DEF")
    for _schema in SCHEMAS.values():
        _fallback_lib.define(_schema)


def _acc_dtype(w_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if w_dtype == torch.float64 else torch.float32


def _out_dtype(weights: Sequence[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32


# ----------------------------------------------------------------------------- argument checks
# The checks of the compiled kernels (csrc/power_step_checks.h, csrc/conv_geometry.h,
# csrc/cpu/circular_conv_cpu.cpp, batched_power_cpu.cpp, shifted_cholesky_cpu.cpp), one checker
# per op family, run by the fakes and the reference kernels. The fakes need them: a fake wins
# dispatch whenever one argument is a meta (or fake) tensor, so without them a call mixing meta
# and CPU tensors returned uninitialized memory and an all-meta call accepted any shape, params
# and n_iter. On top of the kernels' own checks, every tensor argument of one call must be on
# one device. Errors are ValueError/TypeError like the C++ checks (TORCH_CHECK_VALUE/_TYPE).
_WEIGHT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_INT64_MAX = 2 ** 63 - 1


def _require(cond, message, error=ValueError) -> None:
    """Raise ``error(message())`` unless ``cond``: a plain bool is tested in Python (what Dynamo
    traces in the typed wrappers), a symbolic one (dynamic shapes in a fake) by torch._check_with."""
    if isinstance(cond, bool):
        if not cond:
            raise error(message())
    else:
        torch._check_with(error, cond, message)


def _each(name: str, value):
    """``(label, tensor)`` for an argument that is a tensor or a list of tensors."""
    if isinstance(value, (list, tuple)):
        return ((f"{name}[{i}]", t) for i, t in enumerate(value))
    return ((name, value),)


def _check_one_device(op: str, named) -> None:
    """``named``: ``(name, tensor or list of tensors)`` pairs; all on the first one's device."""
    first = None
    for name, value in named:
        for where, t in _each(name, value):
            if first is None:
                first = (where, t.device)
            elif t.device != first[1]:
                raise ValueError(f"{op}: every tensor argument must be on one device: {where} is on {t.device}, "
                                 f"{first[0]} on {first[1]}")


def _check_n_iter(op: str, n_iter) -> None:
    _require(0 <= n_iter <= MAX_ITER, lambda: f"{op}: n_iter must be in [0, {MAX_ITER}] (specreg_fast.ops.MAX_ITER), "
                                              f"got {n_iter}")


def _check_dense_args(op: str, weights, us, vs) -> None:
    """Checks of ``power_step_`` / ``sigma`` / ``sigma_from_step`` (csrc/power_step_checks.h)."""
    _require(len(us) == len(weights) and len(vs) == len(weights),
             lambda: f"{op}: expected as many u and v vectors as weights, got {len(weights)} weights, "
                     f"{len(us)} u, {len(vs)} v")
    _check_one_device(op, (("weights", weights), ("us", us), ("vs", vs)))
    for l, W in enumerate(weights):
        u, v = us[l], vs[l]
        _require(W.dim() == 2, lambda: f"{op}: weights[{l}] must be 2-D, got shape {tuple(W.shape)}")
        _require(W.dtype in _WEIGHT_DTYPES,
                 lambda: f"{op}: weights[{l}] must be float32/float64/bfloat16/float16, got {W.dtype}", TypeError)
        _require(u.dim() == 1 and u.shape[0] == W.shape[0],
                 lambda: f"{op}: us[{l}] must have shape ({W.shape[0]},), got {tuple(u.shape)}")
        _require(v.dim() == 1 and v.shape[0] == W.shape[1],
                 lambda: f"{op}: vs[{l}] must have shape ({W.shape[1]},), got {tuple(v.shape)}")
        acc = _acc_dtype(W.dtype)
        _require(u.dtype == acc and v.dtype == acc,
                 lambda: f"{op}: us[{l}] and vs[{l}] must be {acc} for a {W.dtype} weight, got {u.dtype} "
                         f"and {v.dtype}", TypeError)
        _require(u.is_contiguous() and v.is_contiguous(),
                 lambda: f"{op}: us[{l}]/vs[{l}] must be contiguous")


def _check_power_step_args(op: str, weights, us, vs, n_iter, tol) -> None:
    _check_dense_args(op, weights, us, vs)
    _check_n_iter(op, n_iter)
    _require(tol >= 0, lambda: f"{op}: tol must be >= 0, got {tol}")


def _check_est(op: str, est, weights) -> None:
    _require(est.dim() == 1 and est.shape[0] == len(weights),
             lambda: f"{op}: est must be a 1-D tensor with one entry per weight ({len(weights)}), got "
                     f"shape {tuple(est.shape)}")
    want = _out_dtype(weights)
    _require(est.dtype == want, lambda: f"{op}: est must be {want} (the power step's dtype), got {est.dtype}", TypeError)
    if weights:
        _check_one_device(op, (("weights", weights[0]), ("est", est)))


# The typed wrappers below check their plain arguments before the call, so that a bad one is a
# ValueError/TypeError naming it, not the binding's cast error (n_iter=2**63) or an internal
# assert (a conjugate view written in place).
def _int_arg(op: str, name: str, value, minimum: int = 0, maximum: int = _INT64_MAX):
    """``value`` as a Python int in ``[minimum, maximum]`` (by default the schema's int64)."""
    if isinstance(value, torch.SymInt):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    value = int(value)
    if not minimum <= value <= maximum:
        top = "2**63 - 1" if maximum == _INT64_MAX else f"{maximum} (specreg_fast.ops.MAX_ITER)"
        raise ValueError(f"{op}: {name} must be an int in [{minimum}, {top}], got {value}")
    return value


def _iter_arg(op: str, name: str, value, minimum: int = 0):
    """An iteration count (``n_iter``, ``max_iter``): an int in ``[minimum, MAX_ITER]``."""
    return _int_arg(op, name, value, minimum, MAX_ITER)


def _tol_arg(op: str, tol, finite: bool) -> float:
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        raise TypeError(f"{op}: tol must be a real number, got {type(tol).__name__}")
    try:
        value = float(tol)
    except OverflowError:  # an int beyond float's range
        value = math.copysign(math.inf, tol)
    if not (value >= 0 and (math.isfinite(value) or not finite)):
        raise ValueError(f"{op}: tol must be {'finite and ' if finite else ''}>= 0, got {tol}")
    return value


def _params_arg(op: str, params) -> List[int]:
    params = list(params)
    # (C-level passes first: the penalty hands a conv net's whole packing every step)
    if set(map(type, params)) <= {int} and -_INT64_MAX - 1 <= min(params, default=0) \
            and max(params, default=0) <= _INT64_MAX:
        return params
    return [_int_arg(op, f"params[{i}]", p, -_INT64_MAX - 1) for i, p in enumerate(params)]


def _modes_arg(op: str, modes) -> List[str]:
    modes = list(modes)
    for i, m in enumerate(modes):
        if not isinstance(m, str):
            raise TypeError(f"{op}: padding_modes[{i}] must be a str, got {type(m).__name__}")
    return modes


def _check_writable(op: str, name: str, value) -> None:
    """Arguments written in place must own their values: a conjugate or negative view (``z.conj()``,
    ``z.conj().imag``) would be written through a temporary copy (PyTorch asserts)."""
    tensors = value if isinstance(value, (list, tuple)) else (value,)
    if torch.compiler.is_compiling() or not any(isinstance(t, torch.Tensor) and (t.is_conj() or t.is_neg())
                                                for t in tensors):
        return
    for where, t in _each(name, value):
        if isinstance(t, torch.Tensor) and (t.is_conj() or t.is_neg()):
            raise ValueError(f"{op}: {where} is a conjugate or negative view (z.conj(), z.conj().imag) and is "
                             f"written in place; pass a tensor that owns its values (.resolve_conj() copies)")


def check_disjoint_state(named) -> None:
    """Raise ``ValueError`` naming the entries when two persistent vectors of one call share
    memory (the same tensor as a layer's u and v, one tensor in two layers, overlapping views):
    each is written in place, so one would overwrite the other. ``named``: ``(label, tensor)``
    pairs. Eager only (memory is not visible while torch.compile traces)."""
    if torch.compiler.is_compiling():
        return
    by_storage: dict = {}
    for label, t in named:
        n = t.numel()
        if n == 0:
            continue
        span = n if t.is_contiguous() else sum((k - 1) * st for k, st in zip(t.shape, t.stride())) + 1
        lo = t.storage_offset() * t.element_size()
        hi = lo + span * t.element_size()
        spans = by_storage.setdefault((t.device, t.untyped_storage()._cdata), [])
        for other, olo, ohi in spans:
            if lo < ohi and olo < hi:
                raise ValueError(f"{label} shares memory with {other}: every persistent vector must be its own "
                                 f"tensor (each is written in place)")
        spans.append((label, lo, hi))


# ----------------------------------------------------------------------------- reference kernels
def _power_step_reference(weights: List[torch.Tensor], us: List[torch.Tensor], vs: List[torch.Tensor], n_iter: int,
                          tol: float) -> torch.Tensor:
    """Reference kernel of ``power_step_`` for any device: the per-layer loop of the PyTorch
    reference, with the op's conventions (zero W keeps the vectors, non-finite W rolls them
    back) expressed with ``torch.where`` so no host synchronization is needed."""
    _check_power_step_args("specreg_fast::power_step_", weights, us, vs, n_iter, tol)
    out = torch.zeros(len(weights), dtype=_out_dtype(weights),
                      device=weights[0].device if weights else "cpu")
    with torch.no_grad():
        for l, (W, u, v) in enumerate(zip(weights, us, vs)):
            Wf = W.to(u.dtype)
            u0, v0 = u.clone(), v.clone()
            est = torch.zeros((), dtype=u.dtype, device=u.device)
            prev = None
            for it in range(n_iter):
                t = Wf @ v
                tn = torch.linalg.vector_norm(t)
                a = Wf.t() @ t
                an = torch.linalg.vector_norm(a)
                ok = (tn > 0) & (an > 0)
                u.copy_(torch.where(ok, t / tn, u))
                v.copy_(torch.where(ok, a / an, v))
                est = torch.where(ok, an / tn, torch.zeros_like(an))
                if tol > 0 and prev is not None and bool(torch.abs(est - prev) <= tol * est):
                    break
                prev = est
            if n_iter == 0:
                est = u @ Wf @ v
            bad = ~torch.isfinite(Wf).all() if W.numel() else torch.zeros((), dtype=torch.bool, device=W.device)
            u.copy_(torch.where(bad, u0, u))
            v.copy_(torch.where(bad, v0, v))
            out[l] = torch.where(bad, torch.full_like(est, math.nan), est).to(out.dtype)
    return out


def _sigma_reference(weights: List[torch.Tensor], us: List[torch.Tensor], vs: List[torch.Tensor]) -> torch.Tensor:
    _check_dense_args("specreg_fast::sigma", weights, us, vs)
    dt = _out_dtype(weights)
    if not weights:
        return torch.zeros(0, dtype=dt)
    return torch.stack([(u @ W.to(u.dtype) @ v).to(dt) for W, u, v in zip(weights, us, vs)])


# ----------------------------------------------------------------------------- registration
@torch.library.register_fake("specreg_fast::power_step_")
def _power_step_fake(weights, us, vs, n_iter, tol):
    _check_power_step_args("specreg_fast::power_step_", weights, us, vs, n_iter, tol)
    dev = weights[0].device if weights else torch.device("cpu")
    return weights[0].new_empty(len(weights), dtype=_out_dtype(weights)) if weights else torch.empty(
        0, dtype=torch.float32, device=dev)


@torch.library.register_fake("specreg_fast::sigma")
def _sigma_fake(weights, us, vs):
    _check_dense_args("specreg_fast::sigma", weights, us, vs)
    if not weights:
        return torch.empty(0, dtype=torch.float32)
    return weights[0].new_empty(len(weights), dtype=_out_dtype(weights))


torch.library.impl("specreg_fast::power_step_", "CompositeExplicitAutograd")(_power_step_reference)
torch.library.impl("specreg_fast::sigma", "CompositeExplicitAutograd")(_sigma_reference)


def _sigma_setup_context(ctx, inputs, output):
    weights, us, vs = inputs
    # Copies, not the vectors: they are persistent state that the next power step rewrites in
    # place (without a version bump), so a second call before backward() (summed micro-batch
    # losses, a logging call) would hand this backward the later vectors. As torch's own
    # spectral_norm does; the vectors are small next to the u v^T the backward writes.
    ctx.save_for_backward(*[u.clone() for u in us], *[v.clone() for v in vs])
    ctx.n = len(weights)
    ctx.w_meta = [(w.dtype, w.shape) for w in weights]


def _sigma_backward(ctx, grad):
    # d(u^T W v)/dW = u v^T (exact for the bilinear form with u, v held fixed; at a
    # converged power iteration it is d sigma_max / dW).
    n = ctx.n
    saved = ctx.saved_tensors
    us, vs = saved[:n], saved[n:]
    grads = [rank1_grad(us[l], vs[l], grad[l], ctx.w_meta[l][0]) for l in range(n)]
    return grads, [None] * n, [None] * n


def rank1_grad(left: torch.Tensor, right: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``g * left right^T`` in ``dtype``: the gradient of a bilinear form ``left^T W right``."""
    # scale the short vector, not the outer product: one m x n write per layer
    # (a rank-1 mm, not torch.outer: outer's broadcast multiply splits the fresh, page-
    # faulting output across threads and measured 7x slower on the loaded 2-core machine,
    # 3 x 1024x1024: 48 ms vs 6.9 ms with 2 threads; equal with 1 thread)
    return torch.mm((left * g.to(left.dtype)).unsqueeze(1), right.unsqueeze(0)).to(dtype)


torch.library.register_autograd("specreg_fast::sigma", _sigma_backward, setup_context=_sigma_setup_context)


# sigma_from_step: the forward value is power_step_'s estimate (no second read of W), the
# backward that of sigma. One implementation for every device.
@torch.library.register_fake("specreg_fast::sigma_from_step")
def _sigma_from_step_fake(weights, us, vs, est):
    _check_dense_args("specreg_fast::sigma_from_step", weights, us, vs)
    _check_est("specreg_fast::sigma_from_step", est, weights)
    return torch.empty_like(est)


@torch.library.impl("specreg_fast::sigma_from_step", "CompositeExplicitAutograd")
def _sigma_from_step_impl(weights, us, vs, est):
    return est.clone()


def _sigma_from_step_setup_context(ctx, inputs, output):
    weights, us, vs, _ = inputs
    _sigma_setup_context(ctx, (weights, us, vs), output)


def _sigma_from_step_backward(ctx, grad):
    gw, gu, gv = _sigma_backward(ctx, grad)
    return gw, gu, gv, None


torch.library.register_autograd("specreg_fast::sigma_from_step", _sigma_from_step_backward,
                                setup_context=_sigma_from_step_setup_context)


# ----------------------------------------------------------------------------- eager autograd
# In eager mode the typed wrappers below route the two ``*_from_step`` ops through these
# autograd.Functions: the same value (a copy of the step's estimate) and the same backward
# helpers as the registered autograd, without torch.library's per-call wrapping of a
# Python-registered autograd (pytree flattening of the tensor lists, default filling,
# redispatch): on one 512x512 layer here the op's forward took 63-109 us against 12-16 us for
# the Function, and forward + backward 0.39-0.59 ms against 0.23-0.33 ms, where the power
# step itself takes ~35 us. Under torch.compile, and for torch.ops callers,
# the registered op and its autograd are used as before (tests check both routes agree).
# (forward(ctx, ...) style: a separate setup_context makes every apply bind the signature
# through inspect, ~40 us here.)
class _SigmaFromStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, est, us, vs, *weights):
        _sigma_setup_context(ctx, (weights, us, vs), None)
        return est.clone()

    @staticmethod
    def backward(ctx, grad):
        gw, _, _ = _sigma_backward(ctx, grad)
        return (None, None, None, *gw)


class _ConvSigmaFromStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, est, xs, ys, params, padding_modes, *weights):
        _conv_sigma_setup_context(ctx, (weights, xs, ys, params, padding_modes), None)
        return est.clone()

    @staticmethod
    def backward(ctx, grad):
        gw = _conv_sigma_backward(ctx, grad)[0]
        return (None, None, None, None, None, *gw)


def _eager_autograd(weights) -> bool:
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and any(isinstance(w, torch.Tensor) and w.requires_grad for w in weights))


# ----------------------------------------------------------------------------- typed wrappers
def _typed_call(fn, args, check):
    """``fn(*args)``, with the typed errors of the front. The kernels of specreg_fast._C are built
    on the LibTorch stable ABI, whose errors all reach Python as RuntimeError; when one of their
    argument checks fails (a message ``specreg_fast::<op>: ...``), ``check(*args)`` (the same
    checks in Python, the fakes') raises the ValueError/TypeError naming the argument, and a
    check it does not repeat (memory shared by written vectors) becomes a ValueError with the
    kernel's message. An interrupt stays a RuntimeError. Free on success: nothing runs before
    the call."""
    if torch.compiler.is_compiling():  # the fakes run the checks
        return fn(*args)
    try:
        return fn(*args)
    except RuntimeError as err:
        msg = str(err)
        if not msg.startswith("specreg_fast::") or "interrupted (KeyboardInterrupt)" in msg:
            raise
        check(*args)
        raise ValueError(msg) from None


def power_step_(weights: List[torch.Tensor], us: List[torch.Tensor], vs: List[torch.Tensor], n_iter: int = 1,
                tol: float = 0.0) -> torch.Tensor:
    """Run ``n_iter`` grouped power-iteration steps in place on ``us``/``vs``; returns the
    detached estimates ``u^T W v`` at the new vectors. See ``csrc/specreg_fast.cpp``."""
    op = "specreg_fast::power_step_"
    us, vs = list(us), list(vs)
    _check_writable(op, "us", us)
    _check_writable(op, "vs", vs)
    return _typed_call(torch.ops.specreg_fast.power_step_, (list(weights), us, vs, _iter_arg(op, "n_iter", n_iter),
                                                            _tol_arg(op, tol, finite=False)),
                       lambda w, u, v, n, t: _check_power_step_args(op, w, u, v, n, t))


def sigma(weights: List[torch.Tensor], us: List[torch.Tensor], vs: List[torch.Tensor]) -> torch.Tensor:
    """``u_l^T W_l v_l`` for each layer, differentiable in the weights (gradient ``u v^T``)."""
    return _typed_call(torch.ops.specreg_fast.sigma, (list(weights), list(us), list(vs)),
                       lambda w, u, v: _check_dense_args("specreg_fast::sigma", w, u, v))


def sigma_from_step(weights: List[torch.Tensor], us: List[torch.Tensor], vs: List[torch.Tensor],
                    est: torch.Tensor) -> torch.Tensor:
    """``sigma`` whose value is ``est``, the return of the ``power_step_`` (n_iter >= 1) that
    left ``us``/``vs`` as they are: equal to ``u^T W v`` to float rounding without reading W."""
    if _eager_autograd(weights):
        _check_from_step(weights, us, vs, est)
        return _SigmaFromStep.apply(est, list(us), list(vs), *weights)
    op = "specreg_fast::sigma_from_step"

    def check(w, u, v, e):
        _check_dense_args(op, w, u, v)
        _check_est(op, e, w)

    return _typed_call(torch.ops.specreg_fast.sigma_from_step, (list(weights), list(us), list(vs), est), check)


def _check_from_step(weights, xs, ys, est):
    # what the op's schema and fake check, for the eager route (which bypasses them)
    if not (len(xs) == len(weights) == len(ys)):
        raise ValueError(f"weights and the two vector lists must have the same length, got {len(weights)}, "
                         f"{len(xs)}, {len(ys)}")
    if not isinstance(est, torch.Tensor) or est.shape != (len(weights),):
        raise ValueError(f"est must be a 1-D tensor with one entry per weight ({len(weights)}), got "
                         f"{getattr(est, 'shape', type(est).__name__)}")


# ----------------------------------------------------------------------------- conv operator ops (conv.py)
# Per-layer geometry of the conv ops, packed layer after layer into one int[] (2 + 5 d ints
# for d spatial dims) plus one padding-mode string per layer:
#     [transposed, groups, stride[d], dilation[d], pad_lo[d], pad_hi[d], output_padding[d]]
# (the single description of the packing is csrc/specreg_fast.cpp; this is its encoder/decoder).
def pack_conv_params(specs) -> "tuple[List[int], List[str]]":
    """``(params, padding_modes)`` of the conv ops for a list of :class:`ConvSpec`."""
    params: List[int] = []
    modes: List[str] = []
    for spec in specs:
        d = spec.weight.dim() - 2
        k = tuple(spec.weight.shape[2:])
        if isinstance(spec.padding, str):
            if spec.padding == "valid":
                lo = hi = (0,) * d
            elif spec.padding == "same":
                total = [spec.dilation[i] * (k[i] - 1) for i in range(d)]
                lo = tuple(t // 2 for t in total)
                hi = tuple(t - t // 2 for t in total)
            else:
                raise ValueError(f"padding must be 'same', 'valid' or a tuple, got {spec.padding!r}")
        else:
            lo = hi = tuple(int(p) for p in spec.padding)
        op = tuple(spec.output_padding) if spec.transposed and spec.output_padding else (0,) * d
        params += [int(bool(spec.transposed)), int(spec.groups), *map(int, spec.stride), *map(int, spec.dilation), *lo,
                   *hi, *map(int, op)]
        modes.append(str(spec.padding_mode))
    return params, modes


def _conv_geometry(op: str, weights, params, modes) -> List[dict]:
    """Decode ``params``/``modes`` per layer, with the checks of ``decode`` in
    csrc/conv_geometry.h (the conv and circular families' shared first step)."""
    _require(len(modes) == len(weights),
             lambda: f"{op}: padding_modes must have one entry per layer ({len(weights)}), got {len(modes)}")
    out, off = [], 0
    for l, (W, mode) in enumerate(zip(weights, modes)):
        d = W.dim() - 2
        _require(1 <= d <= 3, lambda: f"{op}: weights[{l}] must be 3-D to 5-D (a 1-D to 3-D conv), got "
                                                f"shape {tuple(W.shape)}")
        need = 2 + 5 * d
        _require(off + need <= len(params), lambda: f"{op}: params too short for layer {l} (need {need} "
                                                              f"entries from offset {off}, have {len(params)})")
        p = list(params[off:off + need])
        off += need
        g = dict(transposed=p[0] != 0, groups=p[1], stride=p[2:2 + d], dilation=p[2 + d:2 + 2 * d],
                 lo=p[2 + 2 * d:2 + 3 * d], hi=p[2 + 3 * d:2 + 4 * d], output_padding=p[2 + 4 * d:2 + 5 * d],
                 mode=mode, d=d)
        _require(g["groups"] >= 1, lambda: f"{op}: layer {l}: groups must be >= 1, got {g['groups']}")
        _require(all(v >= 1 for v in g["stride"] + g["dilation"]),
                 lambda: f"{op}: layer {l}: stride and dilation must be >= 1")
        _require(all(v >= 0 for v in g["lo"] + g["hi"] + g["output_padding"]),
                 lambda: f"{op}: layer {l}: padding and output_padding must be >= 0")
        _require(mode in ("zeros", "circular", "reflect", "replicate"),
                 lambda: f"{op}: layer {l}: padding mode must be zeros/circular/reflect/replicate, got "
                         f"{mode!r}")
        if g["transposed"]:
            _require(mode == "zeros" and g["lo"] == g["hi"],
                     lambda: f"{op}: layer {l}: a transposed conv takes symmetric zero padding only")
        else:
            _require(all(v == 0 for v in g["output_padding"]),
                     lambda: f"{op}: layer {l}: output_padding must be 0 for a conv")
        out.append(g)
    _require(off == len(params), lambda: f"{op}: params has {len(params)} entries, the layers use {off}")
    return out


def _conv_output_shape(op: str, l: int, g: dict, W, in_shape) -> list:
    """The layer's output shape ``(C_out, *spatial)`` for an input ``(C_in, *spatial)``, with
    floor division (a kernel larger than the padded input is an error, not an output of 1)."""
    out = [W.shape[1] * g["groups"] if g["transposed"] else W.shape[0]]
    for i in range(g["d"]):
        n, k, s, dl = in_shape[1 + i], W.shape[2 + i], g["stride"][i], g["dilation"][i]
        if g["transposed"]:
            o = (n - 1) * s - g["lo"][i] - g["hi"][i] + dl * (k - 1) + g["output_padding"][i] + 1
        else:
            o = (n + g["lo"][i] + g["hi"][i] - dl * (k - 1) - 1) // s + 1  # floor: < 1 when k does not fit
        _require(o >= 1, lambda: f"{op}: layer {l}: input {tuple(in_shape)} too small for the kernel")
        entries = (s, dl, g["lo"][i], g["hi"][i], g["output_padding"][i])
        _require(max(entries) < 2 ** 31, lambda: f"{op}: layer {l}: stride, dilation, padding and output_padding "
                                                 f"must be at most 2^31 - 1 (ATen's convolutions take int32), got "
                                                 f"{entries} in spatial dim {i}")
        out.append(o)
    return out


def _check_conv_args(op: str, weights, xs, ys, params, modes, need_contiguous: bool) -> List[dict]:
    """Checks of the conv-operator ops (``decode`` and ``validate`` of csrc/conv_geometry.h);
    returns the decoded geometry."""
    _require(len(xs) == len(weights) and len(ys) == len(weights),
             lambda: f"{op}: weights, xs and ys must have the same length, got {len(weights)}, {len(xs)}, "
                     f"{len(ys)}")
    _check_one_device(op, (("weights", weights), ("xs", xs), ("ys", ys)))
    geo = _conv_geometry(op, weights, params, modes)
    for l, (W, x, y, g) in enumerate(zip(weights, xs, ys, geo)):
        _require(W.dtype in _WEIGHT_DTYPES,
                 lambda: f"{op}: weights[{l}] must be float32/float64/bfloat16/float16, got {W.dtype}", TypeError)
        _require(x.dim() == g["d"] + 1, lambda: f"{op}: xs[{l}] must be (C_in, *spatial) with {g['d']} "
                                                          f"spatial dims, got {tuple(x.shape)}")
        cin = W.shape[0] if g["transposed"] else W.shape[1] * g["groups"]
        cout = W.shape[1] * g["groups"] if g["transposed"] else W.shape[0]
        _require(x.shape[0] == cin, lambda: f"{op}: xs[{l}] has {x.shape[0]} channels, the layer takes {cin}")
        _require(cout % g["groups"] == 0 and cin % g["groups"] == 0,
                 lambda: f"{op}: layer {l}: channels ({cin}, {cout}) not divisible by groups={g['groups']}")
        for i in range(g["d"]):
            n, lo, hi = x.shape[1 + i], g["lo"][i], g["hi"][i]
            if g["mode"] == "reflect":
                _require(lo < n and hi < n, lambda: f"{op}: layer {l}: reflect padding must be < the input "
                                                              f"size")
            if g["mode"] == "circular":
                _require(lo <= n and hi <= n, lambda: f"{op}: layer {l}: circular padding must be <= the "
                                                                f"input size")
            if g["transposed"]:
                _require(g["output_padding"][i] < max(g["stride"][i], g["dilation"][i]),
                         lambda: f"{op}: layer {l}: output_padding must be smaller than stride or dilation")
        oshape = _conv_output_shape(op, l, g, W, x.shape)
        _require(tuple(y.shape) == tuple(oshape),
                 lambda: f"{op}: ys[{l}] must have the output shape {tuple(oshape)}, got {tuple(y.shape)}")
        acc = _acc_dtype(W.dtype)
        _require(x.dtype == acc and y.dtype == acc,
                 lambda: f"{op}: xs[{l}]/ys[{l}] must be {acc} for a {W.dtype} weight, got {x.dtype}/{y.dtype}",
                 TypeError)
        if need_contiguous:
            _require(x.is_contiguous() and y.is_contiguous(),
                     lambda: f"{op}: xs[{l}]/ys[{l}] must be contiguous")
    return geo


def _check_conv_power_step_args(op: str, weights, xs, ys, params, modes, n_iter, tol) -> List[dict]:
    _check_n_iter(op, n_iter)
    _require(tol >= 0 and math.isfinite(tol), lambda: f"{op}: tol must be finite and >= 0, got {tol}")
    return _check_conv_args(op, weights, xs, ys, params, modes, need_contiguous=True)


def _check_circular_args(op: str, weights, xs, x_tops, y_tops, params, n_iter) -> List[dict]:
    """Checks of ``circular_power_step_`` (csrc/cpu/circular_conv_cpu.cpp); returns the geometry."""
    _require(len(xs) == len(weights) and len(x_tops) == len(weights) and len(y_tops) == len(weights),
             lambda: f"{op}: weights, xs, x_tops and y_tops must have the same length, got {len(weights)}, "
                     f"{len(xs)}, {len(x_tops)}, {len(y_tops)}")
    _check_n_iter(op, n_iter)
    _check_one_device(op, (("weights", weights), ("xs", xs), ("x_tops", x_tops), ("y_tops", y_tops)))
    geo = _conv_geometry(op, weights, params, ["circular"] * len(weights))
    for l, (W, x, g) in enumerate(zip(weights, xs, geo)):
        _require(W.dtype in _WEIGHT_DTYPES,
                 lambda: f"{op}: weights[{l}] must be float32/float64/bfloat16/float16, got {W.dtype}", TypeError)
        _require(not g["transposed"],
                 lambda: f"{op}: layer {l}: a circular conv norm needs a ConvNd, not a transposed conv")
        _require(x.dim() == g["d"] + 1, lambda: f"{op}: xs[{l}] must be (C_in, *spatial) with {g['d']} "
                                                          f"spatial dims, got {tuple(x.shape)}")
        _require(x.shape[0] == W.shape[1] * g["groups"],
                 lambda: f"{op}: xs[{l}] has {x.shape[0]} channels, the layer takes "
                         f"{W.shape[1] * g['groups']}")
        _require(W.shape[0] % g["groups"] == 0,
                 lambda: f"{op}: layer {l}: C_out={W.shape[0]} not divisible by groups={g['groups']}")
        acc = _acc_dtype(W.dtype)
        _require(x.dtype == acc, lambda: f"{op}: xs[{l}] must be {acc} for a {W.dtype} weight, got {x.dtype}",
                 TypeError)
        _require(x.is_contiguous(), lambda: f"{op}: xs[{l}] must be contiguous")
        for i in range(g["d"]):
            n = x.shape[1 + i]
            _require(n % g["stride"][i] == 0, lambda: f"{op}: layer {l}: stride {g['stride'][i]} must "
                                                                f"divide the input size {n} (spatial dim {i})")
            _require(g["lo"][i] <= n and g["hi"][i] <= n,
                     lambda: f"{op}: layer {l}: circular padding must be <= the input size")
        oshape = _conv_output_shape(op, l, g, W, x.shape)
        _require(all(oshape[1 + i] == x.shape[1 + i] // g["stride"][i] for i in range(g["d"])),
                 lambda: f"{op}: layer {l}: padding must give the full wrap-around output size (total "
                         f"padding dilation*(kernel-1)), got output {tuple(oshape)}")
        _require(tuple(x_tops[l].shape) == tuple(x.shape) and x_tops[l].dtype == x.dtype,
                 lambda: f"{op}: x_tops[{l}] must be like xs[{l}]")
        _require(tuple(y_tops[l].shape) == tuple(oshape) and y_tops[l].dtype == x.dtype,
                 lambda: f"{op}: y_tops[{l}] must have the output shape {tuple(oshape)} and xs[{l}]'s dtype")
    return geo


def _conv_pad_vec(g):
    v = []
    for i in reversed(range(g["d"])):
        v += [g["lo"][i], g["hi"][i]]
    return v


def _conv_explicit(g):
    return not g["transposed"] and (g["mode"] != "zeros" or g["lo"] != g["hi"])


def _conv_padded_input(g, x):
    """(input handed to aten.convolution, its padding) for a batched x."""
    if _conv_explicit(g):
        mode = "constant" if g["mode"] == "zeros" else g["mode"]
        return torch.nn.functional.pad(x, _conv_pad_vec(g), mode=mode), [0] * g["d"]
    return x, list(g["lo"])


def _conv_apply_ref(g, W, x):
    xp, pad = _conv_padded_input(g, x)
    return torch.ops.aten.convolution(xp, W, None, g["stride"], pad, g["dilation"], g["transposed"],
                                      g["output_padding"], g["groups"])


def _conv_adjoint_ref(g, W, y, x_like):
    # The vector-Jacobian product of the (linear) forward map: exact for every padding mode.
    with torch.enable_grad():
        x0 = torch.zeros_like(x_like).requires_grad_(True)
        (gx,) = torch.autograd.grad(_conv_apply_ref(g, W.detach(), x0), x0, y)
    return gx


def _conv_power_step_reference(weights, xs, ys, params, padding_modes, n_iter, tol):
    """Reference kernel of ``conv_power_step_`` (any device): the same step and conventions
    as the C++ loop, with ``torch.where`` instead of host branches."""
    geo = _check_conv_power_step_args("specreg_fast::conv_power_step_", weights, xs, ys, params, padding_modes,
                                      n_iter, tol)
    out = torch.zeros(len(weights), dtype=_out_dtype(weights), device=weights[0].device if weights else "cpu")
    with torch.no_grad():
        for l, (W, x1, y1, g) in enumerate(zip(weights, xs, ys, geo)):
            Wf = W.to(x1.dtype)
            if not bool(torch.isfinite(Wf).all()):
                out[l] = math.nan
                continue
            x, y = x1[None], y1[None]
            est = torch.zeros((), dtype=x.dtype, device=x.device)
            if n_iter == 0:
                est = (y * _conv_apply_ref(g, Wf, x)).sum()
            prev = None
            for _ in range(n_iter):
                t = _conv_apply_ref(g, Wf, x)
                tn = torch.linalg.vector_norm(t)
                a = _conv_adjoint_ref(g, Wf, t, x)
                an = torch.linalg.vector_norm(a)
                ok = (tn > 0) & (an > 0) & torch.isfinite(tn) & torch.isfinite(an)
                y.copy_(torch.where(ok, t / tn, y))
                x.copy_(torch.where(ok, a / an, x))
                est = torch.where(ok, an / tn, torch.zeros_like(an))
                if tol > 0 and prev is not None and bool(torch.abs(est - prev) <= tol * torch.abs(est)):
                    break
                prev = est
            out[l] = est.to(out.dtype)
    return out


def _conv_sigma_reference(weights, xs, ys, params, padding_modes):
    geo = _check_conv_args("specreg_fast::conv_sigma", weights, xs, ys, params, padding_modes, need_contiguous=False)
    dt = _out_dtype(weights)
    if not weights:
        return torch.zeros(0, dtype=dt)
    return torch.stack([(y[None] * _conv_apply_ref(g, W.to(x.dtype), x[None])).sum().to(dt)
                        for W, x, y, g in zip(weights, xs, ys, geo)])


def _conv_adjoint_reference(weights, xs, ys, params, padding_modes):
    geo = _check_conv_args("specreg_fast::conv_adjoint", weights, xs, ys, params, padding_modes,
                           need_contiguous=False)
    return [_conv_adjoint_ref(g, W.to(y.dtype), y[None], x[None])[0].contiguous()
            for W, x, y, g in zip(weights, xs, ys, geo)]


@torch.library.register_fake("specreg_fast::conv_power_step_")
def _conv_power_step_fake(weights, xs, ys, params, padding_modes, n_iter, tol):
    _check_conv_power_step_args("specreg_fast::conv_power_step_", weights, xs, ys, params, padding_modes, n_iter, tol)
    if not weights:
        return torch.empty(0, dtype=torch.float32)
    return weights[0].new_empty(len(weights), dtype=_out_dtype(weights))


@torch.library.register_fake("specreg_fast::conv_sigma")
def _conv_sigma_fake(weights, xs, ys, params, padding_modes):
    _check_conv_args("specreg_fast::conv_sigma", weights, xs, ys, params, padding_modes, need_contiguous=False)
    if not weights:
        return torch.empty(0, dtype=torch.float32)
    return weights[0].new_empty(len(weights), dtype=_out_dtype(weights))


@torch.library.register_fake("specreg_fast::conv_adjoint")
def _conv_adjoint_fake(weights, xs, ys, params, padding_modes):
    _check_conv_args("specreg_fast::conv_adjoint", weights, xs, ys, params, padding_modes, need_contiguous=False)
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in xs]


torch.library.impl("specreg_fast::conv_power_step_", "CompositeExplicitAutograd")(_conv_power_step_reference)
torch.library.impl("specreg_fast::conv_sigma", "CompositeExplicitAutograd")(_conv_sigma_reference)
torch.library.impl("specreg_fast::conv_adjoint", "CompositeExplicitAutograd")(_conv_adjoint_reference)


def _conv_sigma_setup_context(ctx, inputs, output):
    weights, xs, ys, params, padding_modes = inputs
    # copies of the persistent (x, y), for the reason given in _sigma_setup_context
    ctx.save_for_backward(*weights, *[x.clone() for x in xs], *[y.clone() for y in ys])
    ctx.n = len(weights)
    ctx.params, ctx.modes = list(params), list(padding_modes)


def _conv_weight_grad_reference(weights, xs, ys, params, padding_modes):
    # d<y, A(W) x>/dW with x, y held fixed is the conv weight-gradient with input pad(x) and
    # output-gradient y: one aten.convolution_backward per layer, no autograd graph.
    geo = _check_conv_args("specreg_fast::conv_weight_grad", weights, xs, ys, params, padding_modes,
                           need_contiguous=False)
    grads = []
    for l, g in enumerate(geo):
        W, x, y = weights[l], xs[l], ys[l]
        Wf = W.to(_acc_dtype(W.dtype))
        xp, pad = _conv_padded_input(g, x[None].to(Wf.dtype))
        gw = torch.ops.aten.convolution_backward(y[None].to(Wf.dtype), xp, Wf, None, g["stride"], pad, g["dilation"],
                                                 g["transposed"], g["output_padding"], g["groups"],
                                                 [False, True, False])[1]
        grads.append(gw.contiguous())
    return grads


@torch.library.register_fake("specreg_fast::conv_weight_grad")
def _conv_weight_grad_fake(weights, xs, ys, params, padding_modes):
    _check_conv_args("specreg_fast::conv_weight_grad", weights, xs, ys, params, padding_modes, need_contiguous=False)
    return [torch.empty(W.shape, dtype=_acc_dtype(W.dtype), device=W.device) for W in weights]


torch.library.impl("specreg_fast::conv_weight_grad", "CompositeExplicitAutograd")(_conv_weight_grad_reference)


def _check_conv_weight_grad_add_args(grads, weights, xs, ys, params, padding_modes) -> None:
    op = "specreg_fast::conv_weight_grad_add_"
    _require(len(grads) == len(weights), lambda: f"{op}: grads, weights, xs and ys must have the same "
                                                           f"length, got {len(grads)}, {len(weights)}, {len(xs)}, "
                                                           f"{len(ys)}")
    _check_conv_args(op, weights, xs, ys, params, padding_modes, need_contiguous=False)
    _check_one_device(op, (("weights", weights), ("grads", grads)))
    for l, (G, W) in enumerate(zip(grads, weights)):
        _require(tuple(G.shape) == tuple(W.shape), lambda: f"{op}: grads[{l}] must have the weight's shape "
                                                                     f"{tuple(W.shape)}, got {tuple(G.shape)}")
        _require(G.dtype.is_floating_point,
                 lambda: f"{op}: grads[{l}] must be a floating-point tensor, got {G.dtype}", TypeError)


@torch.library.register_fake("specreg_fast::conv_weight_grad_add_")
def _conv_weight_grad_add_fake(grads, weights, xs, ys, params, padding_modes):
    _check_conv_weight_grad_add_args(grads, weights, xs, ys, params, padding_modes)
    return None


def _conv_weight_grad_add_reference(grads, weights, xs, ys, params, padding_modes):
    _check_conv_weight_grad_add_args(grads, weights, xs, ys, params, padding_modes)
    gws = _conv_weight_grad_reference(weights, xs, ys, params, padding_modes)
    with torch.no_grad():
        for G, gw in zip(grads, gws):
            G.add_(gw)


torch.library.impl("specreg_fast::conv_weight_grad_add_", "CompositeExplicitAutograd")(_conv_weight_grad_add_reference)


def _conv_sigma_backward(ctx, grad):
    n = ctx.n
    saved = ctx.saved_tensors
    weights, xs, ys = saved[:n], saved[n:2 * n], saved[2 * n:]
    # the weight-gradient is linear in y: scale the (output-sized) y by the incoming gradient,
    # not the (weight-sized) result, which saves a full pass over every weight-sized tensor
    ys = [y * grad[l].to(y.dtype) for l, y in enumerate(ys)]
    gws = torch.ops.specreg_fast.conv_weight_grad(list(weights), list(xs), ys, ctx.params, ctx.modes)
    grads = [gw.to(weights[l].dtype) for l, gw in enumerate(gws)]
    return grads, [None] * n, [None] * n, None, None


torch.library.register_autograd("specreg_fast::conv_sigma", _conv_sigma_backward,
                                setup_context=_conv_sigma_setup_context)


# conv_sigma_from_step: the forward value is the power step's estimate (no convolution), the
# backward that of conv_sigma. One implementation for every device.
@torch.library.register_fake("specreg_fast::conv_sigma_from_step")
def _conv_sigma_from_step_fake(weights, xs, ys, params, padding_modes, est):
    _check_conv_args("specreg_fast::conv_sigma_from_step", weights, xs, ys, params, padding_modes,
                     need_contiguous=False)
    _check_est("specreg_fast::conv_sigma_from_step", est, weights)
    return torch.empty_like(est)


@torch.library.impl("specreg_fast::conv_sigma_from_step", "CompositeExplicitAutograd")
def _conv_sigma_from_step_impl(weights, xs, ys, params, padding_modes, est):
    return est.clone()


def _conv_sigma_from_step_setup_context(ctx, inputs, output):
    weights, xs, ys, params, padding_modes, _ = inputs
    _conv_sigma_setup_context(ctx, (weights, xs, ys, params, padding_modes), output)


def _conv_sigma_from_step_backward(ctx, grad):
    return (*_conv_sigma_backward(ctx, grad), None)


torch.library.register_autograd("specreg_fast::conv_sigma_from_step", _conv_sigma_from_step_backward,
                                setup_context=_conv_sigma_from_step_setup_context)


def conv_sigma_from_step(weights: List[torch.Tensor], xs: List[torch.Tensor], ys: List[torch.Tensor],
                         params: List[int], padding_modes: List[str], est: torch.Tensor) -> torch.Tensor:
    """``conv_sigma`` whose value is ``est``, the return of the conv power step (n_iter >= 1)
    that left ``xs``/``ys`` as they are: ``<y, A x>`` to float rounding, without a convolution."""
    if _eager_autograd(weights):
        _check_from_step(weights, xs, ys, est)
        return _ConvSigmaFromStep.apply(est, list(xs), list(ys), list(params), list(padding_modes), *weights)
    return torch.ops.specreg_fast.conv_sigma_from_step(list(weights), list(xs), list(ys), list(params),
                                                       list(padding_modes), est)


def conv_power_step_(weights: List[torch.Tensor], xs: List[torch.Tensor], ys: List[torch.Tensor], params: List[int],
                     padding_modes: List[str], n_iter: int = 1, tol: float = 0.0) -> torch.Tensor:
    """``n_iter`` grouped power steps on conv operators, in place on ``xs``/``ys``; returns
    the detached estimates ``<y, A x>``. ``params``/``padding_modes``: :func:`pack_conv_params`."""
    op = "specreg_fast::conv_power_step_"
    xs, ys = list(xs), list(ys)
    _check_writable(op, "xs", xs)
    _check_writable(op, "ys", ys)
    return torch.ops.specreg_fast.conv_power_step_(list(weights), xs, ys, _params_arg(op, params),
                                                   _modes_arg(op, padding_modes), _iter_arg(op, "n_iter", n_iter),
                                                   _tol_arg(op, tol, finite=True))


def conv_sigma(weights: List[torch.Tensor], xs: List[torch.Tensor], ys: List[torch.Tensor], params: List[int],
               padding_modes: List[str]) -> torch.Tensor:
    """``<y_l, A(W_l) x_l>`` per layer, differentiable in the weights."""
    op = "specreg_fast::conv_sigma"
    return torch.ops.specreg_fast.conv_sigma(list(weights), list(xs), list(ys), _params_arg(op, params),
                                             _modes_arg(op, padding_modes))


def conv_weight_grad(weights: List[torch.Tensor], xs: List[torch.Tensor], ys: List[torch.Tensor], params: List[int],
                     padding_modes: List[str]) -> List[torch.Tensor]:
    """``d<y_l, A(W_l) x_l>/dW_l`` per layer (the conv weight-gradient of input ``x_l`` and
    output-gradient ``y_l``), float32 (float64 for a float64 weight), without autograd."""
    op = "specreg_fast::conv_weight_grad"
    return torch.ops.specreg_fast.conv_weight_grad(list(weights), list(xs), list(ys), _params_arg(op, params),
                                                   _modes_arg(op, padding_modes))


def conv_weight_grad_add_(grads: List[torch.Tensor], weights: List[torch.Tensor], xs: List[torch.Tensor],
                          ys: List[torch.Tensor], params: List[int], padding_modes: List[str]) -> None:
    """``grads[l] += conv_weight_grad(...)[l]`` in place (any float dtype of ``grads[l]``;
    scale ``ys`` to scale the addition). Checks every argument before writing."""
    op = "specreg_fast::conv_weight_grad_add_"
    grads = list(grads)
    _check_writable(op, "grads", grads)
    torch.ops.specreg_fast.conv_weight_grad_add_(grads, list(weights), list(xs), list(ys), _params_arg(op, params),
                                                 _modes_arg(op, padding_modes))


def conv_adjoint(weights: List[torch.Tensor], xs: List[torch.Tensor], ys: List[torch.Tensor], params: List[int],
                 padding_modes: List[str]) -> List[torch.Tensor]:
    """``A(W_l)^T y_l`` per layer (``xs`` give the input shapes)."""
    op = "specreg_fast::conv_adjoint"
    return torch.ops.specreg_fast.conv_adjoint(list(weights), list(xs), list(ys), _params_arg(op, params),
                                               _modes_arg(op, padding_modes))



# ----------------------------------------------------------------------------- circular / FFT ops (fft.py)
# The matrix-free batched per-frequency power step of circular convs; the algorithm and its
# conventions are documented in csrc/cpu/circular_conv_cpu.cpp, which this mirrors.
def _polyphase_split(x, s):
    d = len(s)
    shape = [x.shape[0]]
    for i in range(d):
        shape += [x.shape[1 + i] // s[i], s[i]]
    perm = [0] + [2 + 2 * i for i in range(d)] + [1 + 2 * i for i in range(d)]
    return x.reshape(shape).permute(perm).reshape(x.shape[0] * math.prod(s), *[x.shape[1 + i] // s[i]
                                                                                for i in range(d)])


def _polyphase_merge(z, s, like):
    d = len(s)
    shape = [like[0], *s, *[like[1 + i] // s[i] for i in range(d)]]
    perm = [0]
    for i in range(d):
        perm += [1 + d + i, 1 + i]
    return z.reshape(shape).permute(perm).reshape(like)


def _circular_power_step_reference(weights, xs, x_tops_out, y_tops_out, params, n_iter):
    geo = _check_circular_args("specreg_fast::circular_power_step_", weights, xs, x_tops_out, y_tops_out, params, n_iter)
    out = torch.zeros(len(weights), dtype=_out_dtype(weights), device=weights[0].device if weights else "cpu")
    with torch.no_grad():
        for l, (W, x_state, g) in enumerate(zip(weights, xs, geo)):
            Wf = W.to(x_state.dtype)
            s, d = list(g["stride"]), g["d"]
            dims = list(range(1, d + 1))
            m = [x_state.shape[1 + i] // s[i] for i in range(d)]
            like = tuple(x_state.shape)

            def fwd_in(z):
                return torch.fft.rfftn(_polyphase_split(z, s), dim=dims, norm="ortho")

            def inv_in(Z):
                return _polyphase_merge(torch.fft.irfftn(Z, s=m, dim=dims, norm="ortho"), s, like)

            tiny = torch.finfo(x_state.dtype).tiny
            X = fwd_in(x_state)
            nx = torch.linalg.vector_norm(X, dim=0)
            Xn = X / nx.clamp_min(tiny)
            Xn[0] += (nx == 0).to(nx.dtype)
            xh = inv_in(Xn)
            steps = max(n_iter, 1)
            for it in range(steps):
                t = _conv_apply_ref(g, Wf, xh[None])[0]
                T = torch.fft.rfftn(t, dim=dims, norm="ortho")
                sig = torch.linalg.vector_norm(T, dim=0)
                if it == steps - 1:
                    flat = sig.reshape(-1)
                    onehot = (torch.arange(flat.numel(), device=flat.device) == flat.argmax()).to(
                        x_state.dtype).reshape(sig.shape)
                    xt = inv_in(Xn * onehot)
                    yt = torch.fft.irfftn(T * onehot, s=m, dim=dims, norm="ortho")
                    x_tops_out[l].copy_(xt / torch.linalg.vector_norm(xt).clamp_min(tiny))
                    y_tops_out[l].copy_(yt / torch.linalg.vector_norm(yt).clamp_min(tiny))
                    out[l] = flat.max().to(out.dtype)
                if n_iter == 0:
                    break
                a = _conv_adjoint_ref(g, Wf, t[None], xh[None])[0]
                A = fwd_in(a)
                na = torch.linalg.vector_norm(A, dim=0)
                Xn = torch.where(na > 0, A / na.clamp_min(tiny), Xn)
                xh = inv_in(Xn)
            finite = torch.isfinite(out[l])
            if n_iter > 0:
                x_state.copy_(torch.where(finite, xh, x_state))
            out[l] = torch.where(finite, out[l], torch.full_like(out[l], math.nan))
    return out


@torch.library.register_fake("specreg_fast::circular_power_step_")
def _circular_power_step_fake(weights, xs, x_tops, y_tops, params, n_iter):
    _check_circular_args("specreg_fast::circular_power_step_", weights, xs, x_tops, y_tops, params, n_iter)
    if not weights:
        return torch.empty(0, dtype=torch.float32)
    return weights[0].new_empty(len(weights), dtype=_out_dtype(weights))


torch.library.impl("specreg_fast::circular_power_step_", "CompositeExplicitAutograd")(_circular_power_step_reference)


def circular_output_shapes(weights: List[torch.Tensor], xs: List[torch.Tensor], params: List[int]):
    """The output shape ``(C_out, *(N / stride))`` of each full wrap-around conv."""
    op = "specreg_fast::circular_power_step_"
    _require(len(xs) == len(weights), lambda: f"{op}: weights and xs must have the same length, got "
                                                        f"{len(weights)}, {len(xs)}")
    geo = _conv_geometry(op, weights, params, ["circular"] * len(weights))
    for l, (x, g) in enumerate(zip(xs, geo)):
        _require(x.dim() == g["d"] + 1, lambda: f"{op}: xs[{l}] must be (C_in, *spatial) with {g['d']} "
                                                          f"spatial dims, got {tuple(x.shape)}")
    return [(W.shape[0], *[x.shape[1 + i] // g["stride"][i] for i in range(g["d"])])
            for W, x, g in zip(weights, xs, geo)]


def circular_power_step_(weights: List[torch.Tensor], xs: List[torch.Tensor], params: List[int], n_iter: int = 1):
    """``n_iter`` matrix-free batched per-frequency power steps of circular convs, in place on
    ``xs``; returns ``(estimates, x_tops, y_tops)``, the top-frequency pairs in fresh buffers
    (see ``csrc/specreg_fast.cpp``)."""
    op = "specreg_fast::circular_power_step_"
    weights, xs, params = list(weights), list(xs), _params_arg(op, params)
    n_iter = _iter_arg(op, "n_iter", n_iter)
    _check_writable(op, "xs", xs)
    x_tops = [torch.empty_like(x, memory_format=torch.contiguous_format) for x in xs]
    y_tops = [x.new_empty(shape) for x, shape in zip(xs, circular_output_shapes(weights, xs, params))]
    est = torch.ops.specreg_fast.circular_power_step_(weights, xs, x_tops, y_tops, params, n_iter)
    return est, x_tops, y_tops


# ----------------------------------------------------------------------------- explicit-block power iteration
def _check_batched_args(blocks, us, vs, n_iter) -> None:
    """Checks of ``batched_power_step_`` (csrc/cpu/batched_power_cpu.cpp)."""
    op = "specreg_fast::batched_power_step_"
    _require(blocks.dim() == 3, lambda: f"{op}: blocks must be a (B, m, n) stack, got shape "
                                                  f"{tuple(blocks.shape)}")
    _require(blocks.dtype in (torch.float32, torch.float64, torch.complex64, torch.complex128),
             lambda: f"{op}: blocks must be float32/float64/complex64/complex128, got {blocks.dtype}", TypeError)
    B, m, n = blocks.shape
    _require(tuple(us.shape) == (B, m) and tuple(vs.shape) == (B, n),
             lambda: f"{op}: us must be ({B}, {m}) and vs ({B}, {n}), got {tuple(us.shape)} and "
                     f"{tuple(vs.shape)}")
    _require(us.dtype == blocks.dtype and vs.dtype == blocks.dtype,
             lambda: f"{op}: us/vs must have the blocks' dtype {blocks.dtype}, got {us.dtype}/{vs.dtype}", TypeError)
    _require(us.is_contiguous() and vs.is_contiguous(), lambda: f"{op}: us/vs must be contiguous")
    _check_one_device(op, (("blocks", blocks), ("us", us), ("vs", vs)))
    _check_n_iter(op, n_iter)


def _batched_power_step_reference(blocks, us, vs, n_iter):
    """Reference kernel of ``batched_power_step_`` (any device), in place on us/vs."""
    _check_batched_args(blocks, us, vs, n_iter)
    with torch.no_grad():
        for _ in range(n_iter):
            t = torch.einsum("bmn,bn->bm", blocks, vs)
            a = torch.einsum("bmn,bm->bn", blocks.conj(), t)
            tn = torch.linalg.vector_norm(t, dim=1, keepdim=True)
            an = torch.linalg.vector_norm(a, dim=1, keepdim=True)
            ok = (tn > 0) & (an > 0) & torch.isfinite(tn) & torch.isfinite(an)
            us.copy_(torch.where(ok, t / torch.where(ok, tn, 1), us))
            vs.copy_(torch.where(ok, a / torch.where(ok, an, 1), vs))
        return torch.linalg.vector_norm(torch.einsum("bmn,bn->bm", blocks, vs), dim=1)


@torch.library.register_fake("specreg_fast::batched_power_step_")
def _batched_power_step_fake(blocks, us, vs, n_iter):
    _check_batched_args(blocks, us, vs, n_iter)
    return blocks.new_empty(blocks.shape[0], dtype=blocks.real.dtype if blocks.is_complex() else blocks.dtype)


torch.library.impl("specreg_fast::batched_power_step_", "CompositeExplicitAutograd")(_batched_power_step_reference)


def _batched_power_step_lazy_view(blocks, us, vs, n_iter):
    """The kernel of the Conjugate and Negative keys, reached only when some argument is a lazy
    conj/neg view (x.conj(), torch._neg_view): PyTorch's fallback would materialize it, but for
    a written Tensor argument it stops at an internal assert. Written views get a clear error,
    the read-only blocks are materialized. (In Python: torch 2.11's stable ABI, which the
    compiled library is built on, has neither is_conj nor a typed dispatcher call.)"""
    _require(not (us.is_conj() or us.is_neg() or vs.is_conj() or vs.is_neg()),
             lambda: "specreg_fast::batched_power_step_: us/vs are lazy conj/neg views (x.conj()), which the op "
                     "cannot write in place; pass x.resolve_conj()")
    return torch.ops.specreg_fast.batched_power_step_(blocks.resolve_conj().resolve_neg(), us, vs, n_iter)


for _key in ("Conjugate", "Negative"):
    torch.library.impl("specreg_fast::batched_power_step_", _key)(_batched_power_step_lazy_view)


def batched_power_step_(blocks: torch.Tensor, us: torch.Tensor, vs: torch.Tensor, n_iter: int = 1) -> torch.Tensor:
    """``n_iter`` power steps on every block of ``blocks`` (B, m, n), in place on ``us``
    (B, m) / ``vs`` (B, n); returns ``|P_b v_b|`` per block (see ``csrc/specreg_fast.cpp``)."""
    op = "specreg_fast::batched_power_step_"
    _check_writable(op, "us", us)
    _check_writable(op, "vs", vs)
    return _typed_call(torch.ops.specreg_fast.batched_power_step_, (blocks, us, vs, _iter_arg(op, "n_iter", n_iter)),
                       _check_batched_args)


# ----------------------------------------------------------------------------- Cholesky test (certified bounds)
def _check_cholesky_args(H, shift, allow_real: bool = False) -> None:
    """Checks of ``shifted_cholesky_info`` (csrc/cpu/shifted_cholesky_cpu.cpp); ``allow_real``
    for the reference kernel, which bounds.py also runs on real float64 stacks."""
    op = "specreg_fast::shifted_cholesky_info"
    _require(H.dim() == 3 and H.shape[1] == H.shape[2],
             lambda: f"{op}: H must be a (B, c, c) stack, got shape {tuple(H.shape)}")
    dtypes = (torch.complex64, torch.complex128) + ((torch.float32, torch.float64) if allow_real else ())
    _require(H.dtype in dtypes, lambda: f"{op}: H must be complex64/complex128, got {H.dtype}", TypeError)
    real = H.real.dtype
    _require(shift.dim() == 1 and shift.shape[0] == H.shape[0],
             lambda: f"{op}: shift must have shape ({H.shape[0]},), got {tuple(shift.shape)}")
    _require(shift.dtype == real, lambda: f"{op}: shift must be {real} (the real dtype of H), got "
                                                   f"{shift.dtype}", TypeError)
    _check_one_device(op, (("H", H), ("shift", shift)))


def _shifted_cholesky_info_reference(H, shift):
    """Reference kernel of ``shifted_cholesky_info`` (any device): LAPACK/cuSOLVER's info."""
    _check_cholesky_args(H, shift, allow_real=True)
    with torch.no_grad():
        A = torch.neg(H)
        A.diagonal(dim1=-2, dim2=-1).add_(shift[:, None])
        return torch.linalg.cholesky_ex(A, upper=True).info.to(torch.int32)


@torch.library.register_fake("specreg_fast::shifted_cholesky_info")
def _shifted_cholesky_info_fake(H, shift):
    _check_cholesky_args(H, shift)
    return H.new_empty(H.shape[0], dtype=torch.int32)


torch.library.impl("specreg_fast::shifted_cholesky_info", "CompositeExplicitAutograd")(_shifted_cholesky_info_reference)


def shifted_cholesky_info(H: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``info`` of the Cholesky factorization of ``shift_b I - H_b`` for each block of the
    complex stack ``H`` (B, c, c), read from its upper triangle: 0 where the matrix was found
    positive definite, else the 1-based index of the first non-positive pivot (int32; see
    ``csrc/specreg_fast.cpp``). The test behind :func:`specreg_fast.bounds.circular_cholesky_bound`."""
    if not isinstance(H, torch.Tensor) or not H.is_complex() or H.dim() != 3 or H.shape[1] != H.shape[2]:
        raise ValueError(f"H must be a complex (B, c, c) tensor, got "
                         f"{tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__}")
    if not isinstance(shift, torch.Tensor) or shift.shape != (H.shape[0],) or shift.dtype != H.real.dtype:
        raise ValueError(f"shift must be a {H.real.dtype} tensor of shape ({H.shape[0]},)")
    return _typed_call(torch.ops.specreg_fast.shifted_cholesky_info, (H, shift), _check_cholesky_args)

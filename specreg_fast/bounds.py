"""Certified brackets ``[lower, upper]`` on a layer's spectral norm.

* lower: the power-iteration value ``<y, A x>`` with unit ``x, y`` (never above the norm).
* upper, dense: Gram iteration (Delattre, Barthelemy, Araujo & Allauzen, ICML 2023):
  ``sigma_1(W)^(2^t) = sigma_1(G_t)`` for ``G_{t+1} = G_t^H G_t``, and
  ``sigma_1(G_t) <= ||G_t||_F``; the rescaling is tracked in log space in float64.
* upper, circular conv (stride dividing the size): from its Fourier blocks
  (``fft.circular_blocks``, one per frequency of the half spectrum, batched), max over the
  blocks: by default one Cholesky factorization per block certifies ``P^H P <= mu^2 I`` at a
  ``mu`` within ``rtol`` of the exact circular norm (``circular_cholesky_bound``, rounding
  errors bounded explicitly); or Gram iteration on the blocks (``circular_gram_bound``).
* upper, zero-padded conv (any stride): the operator at size ``n`` is a restriction of the
  circular conv at size ``N = ceil((n + pad_lo + pad_hi) / s) * s`` (zero-embed the input
  at offset ``pad_lo``: every valid output reads indices below ``N``, so nothing wraps; keep
  the valid outputs), so the circular bound at ``N`` bounds it. The circular norm at the SAME
  size does not (kernel [1, -1], n = 3: 1.732 < 1.802).
* upper, zero-padded transposed conv: the adjoint of the conv with the same weight at the
  transposed conv's output size, so the same bound there.
* otherwise (output_padding >= stride): the Schur test
  ``sqrt(max row abs-sum * max column abs-sum)`` of the operator, from the kernel (loose).
Reflect/replicate padding has no bound here (the pad map duplicates entries): ValueError.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from . import reference as ref

__all__ = ["gram_upper_bound", "circular_gram_bound", "circular_cholesky_bound", "conv_upper_bound",
           "schur_conv_bound", "operator_norm_bounds"]

# float64 rounding of the SVD / Gram products: a relative margin far above it
_SAFETY = 1 + 1e-9


def gram_upper_bound(W: torch.Tensor, n_iter: int = 6) -> float:
    """Certified upper bound on sigma_max of a 2-D matrix by ``n_iter`` Gram iterations."""
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D, got shape {tuple(W.shape)}")
    G = W.detach().to(torch.float64)
    if G.shape[0] < G.shape[1]:
        G = G.t()
    log_scale = 0.0
    for _ in range(n_iter):
        f = torch.linalg.matrix_norm(G, "fro").item()
        if f == 0.0:
            return 0.0
        G = G / f
        log_scale = 2.0 * (log_scale + math.log(f))
        G = G.t() @ G
    f = torch.linalg.matrix_norm(G, "fro").item()
    if f == 0.0:
        return 0.0
    return math.exp((log_scale + math.log(f)) / 2 ** n_iter) * _SAFETY


def circular_gram_bound(weight: torch.Tensor, size: Sequence[int], stride=1, dilation=1, groups: int = 1,
                        n_iter: int = 8, lower: Optional[float] = None, rtol: float = 1e-3) -> float:
    """Certified upper bound on the norm of the circular conv with ``weight`` at spatial
    ``size``: Gram iteration on every Fourier block at once (float64, per-block log-space
    rescaling), the max over blocks. Stops after ``n_iter`` iterations, or earlier once the
    bound is within ``rtol`` of ``lower`` (a known lower bound, e.g. the power iteration's).

    Blocks that cannot hold the maximum are dropped as the iteration goes: with ``G_t`` of
    size c x c, ``||G_t||_F / sqrt(c) <= sigma_1(G_t) <= ||G_t||_F``, so each block has a
    certified interval for its sigma_1 at every step, and a block whose upper end is below the
    largest lower end (or below ``lower``) is out for good. Most frequencies go after one or
    two iterations, which is what makes the bound affordable on large layers."""
    from .fft import circular_blocks

    P = circular_blocks(weight.detach().to(torch.float64), size, stride, dilation, groups)
    if P.numel() == 0:
        return 0.0
    tiny = torch.finfo(torch.float64).tiny
    floor = math.log(lower) if lower is not None and lower > 0 else -math.inf

    def fro(X):  # (through the real view: matrix_norm on complex measured 3x slower)
        return torch.linalg.vector_norm(torch.view_as_real(X), dim=(1, 2, 3))

    G = P  # G_0; G_1 is the Gram of the smaller side, P P^H or P^H P
    c = min(P.shape[1], P.shape[2])
    log_scale = torch.zeros(P.shape[0], dtype=torch.float64)
    ub = math.inf
    for t in range(n_iter + 1):
        f = fro(G)
        log_f = torch.log(f)  # -inf for a zero block: its interval is [0, 0]
        log_hi = (log_scale + log_f) / 2 ** t
        log_lo = (log_scale + log_f - 0.5 * math.log(c)) / 2 ** t
        ub = min(ub, math.exp(float(log_hi.max())) * _SAFETY)
        best_lo = max(float(log_lo.max()), floor)
        if t == n_iter or (lower is not None and ub <= lower * (1 + rtol)):
            break
        keep = log_hi >= best_lo - 1e-12
        if not bool(keep.all()):  # (indexing copies every block: only when some go)
            G, log_scale, f = G[keep], log_scale[keep], f[keep]
        f = f.clamp_min(tiny)
        G = G / f[:, None, None].to(G.dtype)
        log_scale = 2.0 * (log_scale + torch.log(f))
        if t == 0 and G.shape[1] < G.shape[2]:
            G = G @ G.mH
        else:
            G = G.mH @ G
    return ub


_U64, _U32 = 2.0 ** -53, 2.0 ** -24  # unit roundoffs


def _gamma(k: int, u: float = _U64) -> float:
    """Higham's gamma_k = k u / (1 - k u)."""
    return k * u / (1 - k * u)


def _gram(P: torch.Tensor) -> torch.Tensor:
    """``P^H P`` or ``P P^H``, whichever is smaller."""
    return P.mH @ P if P.shape[-1] <= P.shape[-2] else P @ P.mH


def _cholesky_fails(H: torch.Tensor, mu2: float, eps: torch.Tensor) -> torch.Tensor:
    """Mask of the blocks whose ``mu2 (1 - eps) I - H`` has no Cholesky factorization (read
    from the upper triangle; the C++ op on CPU, LAPACK/cuSOLVER elsewhere)."""
    from .ops import _shifted_cholesky_info_reference, shifted_cholesky_info

    shift = (mu2 * (1 - eps)).to(H.real.dtype)
    # the unblocked C++ test wins while a block's scratch fits in L2; LAPACK's blocked potrf beyond
    test = shifted_cholesky_info if H.shape[-1] <= 256 else _shifted_cholesky_info_reference
    return test(H, shift) != 0


def circular_cholesky_bound(weight: torch.Tensor, size: Sequence[int], stride=1, dilation=1, groups: int = 1,
                            lower: Optional[float] = None, rtol: float = 1e-3, guess_blocks: int = 4) -> float:
    """Certified upper bound on the norm of the circular conv with ``weight`` at spatial
    ``size``, within ``rtol`` of the exact circular norm: one Cholesky factorization per
    Fourier block certifies ``P(w)^H P(w) <= mu^2 I`` for every frequency at once.

    Steps: the blocks ``P(w)`` (``fft.circular_blocks``) and their Grams ``H(w)`` (the
    smaller side), in complex64 when the float32 margin stays small (block side c <~ 400),
    else complex128; a guess ``mu`` = (1 + rtol) x the largest eigenvalue among the few blocks
    that three power steps rank highest (``eigvalsh`` on their float64 blocks); then the test
    ``cholesky(mu^2 (1 - eps) I - H(w))`` on every block. A block the complex64 test cannot
    certify (those within its ``eps`` of ``mu``: the top few) is redone in float64, and a
    block that fails there gets its exact top eigenvalue, which raises ``mu`` (a block
    certified at a smaller ``mu`` stays certified).
    ``guess_blocks`` is how many blocks get an exact eigenvalue for the guess (0: the guess is
    ``max ||P||_F / sqrt(c)``, too low, and the failures raise it: slower, same bound).

    Why this is a certificate: a Cholesky factorization that completes in floating point is
    the exact factorization of ``A + dA`` with ``||dA||_2 <= gamma_{c+1} tr(A) / (1 - c
    gamma_{c+1})`` (Demmel 1989; Rump 2006 turns it into a positive-definiteness test), so
    ``A = mu^2 (1 - eps) I - H`` is then >= -that. ``eps`` covers it (doubled for complex
    arithmetic, with ``tr(A) <= c mu^2``), the rounding of ``H`` (``||dH||_2 <= 2
    gamma_{k+2} ||P||_F^2``, k the inner dimension) and of the diagonal, each in the
    precision used. The error of ``P`` itself (sums over the T taps, twiddles and, in
    float32, the weight rounded once) is at most ``delta = 3 gamma_{T+8} sqrt(T) ||W||_F``
    (plus ``u32 sqrt(T) ||W||_F`` in float32): float64 blocks are certified below ``mu``,
    float32 ones below ``mu + delta64 - delta32``, and the bound is ``mu + delta64``.
    ``rtol`` is the slack that lets the guess pass.

    Cost: one batched Gram of the blocks and one batched Cholesky, mostly in complex64,
    against the Gram iteration's repeated float64 squarings (:func:`circular_gram_bound`);
    measured faster and tighter on the ResNet-18 shapes (``bench/bench_bounds.py``)."""
    from .fft import circular_blocks

    if not isinstance(rtol, (int, float)) or not rtol > 0:
        raise ValueError(f"rtol must be a positive number, got {rtol!r}")
    w = weight.detach().to(torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight has non-finite entries: no bound")
    cout, cin_g = w.shape[0], w.shape[1]
    S = math.prod(stride) if isinstance(stride, (tuple, list)) else stride ** (w.dim() - 2)
    m, n = cout // groups, cin_g * S
    c, k = min(m, n), max(m, n)
    T = int(math.prod(w.shape[2:]))
    w_fro = float(torch.linalg.vector_norm(w))
    if w.numel() == 0 or w_fro == 0.0:
        return 0.0
    # error of the computed blocks (sums over the T taps, twiddles rounded once; in float32 also
    # the cast of the weight): sigma_1(P_exact) <= sigma_1(P_computed) + delta
    delta64 = 3 * _gamma(T + 8) * math.sqrt(T) * w_fro
    delta32 = (3 * _gamma(T + 8, _U32) + _U32) * math.sqrt(T) * w_fro
    # the bulk in complex64 where its Cholesky margin stays small (it grows like c^2 u32)
    eps32_chol = 2 * _gamma(c + 2, _U32) * c / (1 - c * _gamma(c + 2, _U32)) + 4 * _U32
    use32 = c >= 16 and eps32_chol < 2e-2
    P = circular_blocks(w.float() if use32 else w, size, stride, dilation, groups)
    B = P.shape[0]
    fro2 = torch.linalg.vector_norm(torch.view_as_real(P), dim=(1, 2, 3)).double() ** 2  # ||P(w)||_F^2
    H = _gram(P)

    def blocks64(idx: torch.Tensor) -> torch.Tensor:  # the float64 blocks of these indices
        if not use32:
            return P[idx]
        f, inv = torch.unique(torch.div(idx, groups, rounding_mode="floor"), return_inverse=True)
        return circular_blocks(w, size, stride, dilation, groups, freqs=f)[inv * groups + idx % groups]

    # --- the guess: rank the blocks by three power steps, exact top eigenvalue of the best few
    diag = H.diagonal(dim1=-2, dim2=-1).real
    x = torch.take_along_dim(H, diag.argmax(-1)[:, None, None].expand(B, c, 1), dim=2)  # H e_j, j = max diag
    for _ in range(3):
        x = H @ x
        x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-30)
    ray = (x.mH @ (H @ x)).real.flatten()
    top = ray.topk(min(B, max(0, int(guess_blocks)))).indices
    lam = float(torch.linalg.eigvalsh(_gram(blocks64(top)))[:, -1].max()) if top.numel() else 0.0
    # ||P||_F^2 / c <= sigma_1^2 keeps the guess positive whenever a block is non-zero
    mu2 = max(lam, float((fro2 / c).max()), (lower or 0.0) ** 2) * (1 + rtol) ** 2

    # --- the certificate: every block is shown to have sigma_1(P_exact) <= sqrt(mu2) + delta64
    if use32:
        mu32 = math.sqrt(mu2) + delta64 - delta32  # certify the float32 blocks below this
        eps32 = eps32_chol + 2 * _gamma(k + 2, _U32) * fro2 / mu32 ** 2
        pending = torch.nonzero(_cholesky_fails(H, mu32 ** 2, eps32)).flatten() if mu32 > 0 else torch.arange(B)
        P64 = blocks64(pending)
        H64 = _gram(P64)
        fro2_64 = torch.linalg.vector_norm(torch.view_as_real(P64), dim=(1, 2, 3)) ** 2
    else:
        pending, H64, fro2_64 = torch.arange(B), H, fro2
    slack = (1 + rtol) ** 2
    for _ in range(64):
        if pending.numel() == 0:
            break
        eps64 = 2 * _gamma(c + 2) * c / (1 - c * _gamma(c + 2)) + 2 * _gamma(k + 2) * fro2_64 / mu2 + 4 * _U64
        bad = _cholesky_fails(H64, mu2, eps64)
        if not bool(bad.any()):
            break
        # their exact top eigenvalues raise mu; the slack grows if rounding still defeats it
        pending, H64, fro2_64 = pending[bad], H64[bad], fro2_64[bad]
        mu2 = max(mu2, float(torch.linalg.eigvalsh(H64)[:, -1].max()) * slack)
        slack *= slack
    else:  # pragma: no cover - unreachable: the slack doubles in the exponent every round
        raise RuntimeError("Cholesky certificate did not converge")
    return (math.sqrt(mu2) + delta64) * _SAFETY


def schur_conv_bound(m: nn.Module) -> Optional[float]:
    """Schur-test bound of a zero-padded (transposed) conv: a row of the operator holds at most
    one output channel's taps, a column at most every output channel's taps on one input
    channel, whatever the stride; zero padding only removes entries. None for other modes."""
    if not isinstance(m, nn.modules.conv._ConvNd) or m.padding_mode != "zeros":
        return None
    # The two sums over the kernel's first two axes: for a conv one is the row bound and the
    # other the column bound; a transposed conv swaps them, and the product is the same.
    # (With groups > 1 the second sum also runs over other groups' channels: larger, still a bound.)
    a = m.weight.detach().abs().double()
    s0, s1 = a.flatten(1).sum(1).max(), a.transpose(0, 1).flatten(1).sum(1).max()
    return float(torch.sqrt(s0 * s1)) * _SAFETY


def _pads(m: nn.Module, spatial: Sequence[int]):
    d = len(spatial)
    k = m.weight.shape[2:]
    if m.padding == "valid":
        return (0,) * d, (0,) * d
    if m.padding == "same":
        total = [m.dilation[i] * (k[i] - 1) for i in range(d)]
        return tuple(t // 2 for t in total), tuple(t - t // 2 for t in total)
    return tuple(m.padding), tuple(m.padding)


def conv_upper_bound(m: nn.Module, input_shape: Sequence[int], n_iter: int = 8, lower: Optional[float] = None,
                     rtol: float = 1e-3, method: str = "cholesky") -> float:
    """Certified upper bound on the operator norm of conv ``m`` at ``input_shape``, from the
    Fourier blocks of a circular conv (see the module docstring for which one):
    ``method="cholesky"`` (default) certifies the circular norm to within ``rtol``
    (:func:`circular_cholesky_bound`); ``method="gram"`` runs ``n_iter`` Gram iterations
    (:func:`circular_gram_bound`, stopping early within ``rtol`` of ``lower``)."""
    if not isinstance(m, nn.modules.conv._ConvNd):
        raise TypeError(f"expected a conv module, got {type(m).__name__}")
    if method not in ("cholesky", "gram"):
        raise ValueError(f"method must be 'cholesky' or 'gram', got {method!r}")
    spatial = tuple(int(s) for s in input_shape[1:])
    w = m.weight.detach().double()
    d = len(spatial)
    if method == "gram":
        circular_bound, kw = circular_gram_bound, dict(n_iter=n_iter, lower=lower, rtol=rtol)
    else:
        circular_bound, kw = circular_cholesky_bound, dict(lower=lower, rtol=rtol)
    if method == "cholesky" and all(k == 1 for k in w.shape[2:]) and m.padding_mode in ("zeros", "circular"):
        # a 1x1 conv (any stride, padding, transposed or not) applies W_g at every pixel it
        # keeps: its norm is max_g ||W_g||, the circular conv with this kernel at size 1
        return circular_bound(w, (1,) * d, 1, 1, m.groups, **kw)
    if m.padding_mode == "circular" and not m.transposed and all(n % s == 0 for n, s in zip(spatial, m.stride)):
        return circular_bound(w, spatial, m.stride, m.dilation, m.groups, **kw)
    if m.padding_mode == "zeros":
        if m.transposed:
            # the adjoint of the conv with this weight at the transposed conv's output size
            if any(op >= s for op, s in zip(m.output_padding, m.stride)):
                return schur_conv_bound(m)
            size = [(spatial[i] - 1) * m.stride[i] - 2 * m.padding[i] + m.dilation[i] * (w.shape[2 + i] - 1)
                    + m.output_padding[i] + 1 for i in range(d)]
            lo = hi = tuple(m.padding)
        else:
            size = list(spatial)
            lo, hi = _pads(m, spatial)
        N = [-(-(size[i] + lo[i] + hi[i]) // m.stride[i]) * m.stride[i] for i in range(d)]
        return circular_bound(w, N, m.stride, m.dilation, m.groups, **kw)
    raise ValueError(f"no certified upper bound for padding_mode={m.padding_mode!r}: the padding map "
                     f"duplicates entries")


def operator_norm_bounds(layer: Union[nn.Module, torch.Tensor], input_shape: Optional[Sequence[int]] = None,
                         n_iter: int = 6, power_tol: float = 1e-6) -> Tuple[float, float, float]:
    """``(lower, upper, relative gap)`` for a 2-D weight, an ``nn.Linear`` or a conv module at
    ``input_shape`` (``(C_in, *spatial)``; required for convs). Dense: ``n_iter`` Gram
    iterations. Convs: the Cholesky certificate on the Fourier blocks, within 1e-3 of the
    circular norm that bounds the operator (:func:`conv_upper_bound`)."""
    from .conv import conv_operator_norm
    from .dense import spectral_norm

    if isinstance(layer, nn.modules.conv._ConvNd):
        if input_shape is None:
            raise ValueError(f"input_shape (C_in, *spatial) is required for a {type(layer).__name__}")
        lower = float(conv_operator_norm(layer, input_shape, tol=power_tol).detach())
        upper = conv_upper_bound(layer, input_shape, lower=lower)
    else:
        W = layer.weight if isinstance(layer, nn.Linear) else layer
        if not isinstance(W, torch.Tensor) or W.dim() != 2:
            raise TypeError("layer must be an nn.Linear, a conv module or a 2-D tensor")
        lower = float(spectral_norm(W.detach(), tol=power_tol))
        upper = gram_upper_bound(W, n_iter)
    gap = (upper - lower) / upper if upper > 0 else 0.0
    return lower, upper, gap

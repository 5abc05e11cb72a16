"""Certified brackets ``[lower, upper]`` on a layer's spectral norm.

* lower: the power-iteration value ``<y, A x>`` with unit ``x, y`` (never above the norm).
* upper, dense: Gram iteration (Delattre, Barthelemy, Araujo & Allauzen, ICML 2023):
  ``sigma_1(W)^(2^t) = sigma_1(G_t)`` for ``G_{t+1} = G_t^H G_t``, and
  ``sigma_1(G_t) <= ||G_t||_F``; the rescaling is tracked in log space in float64, and the
  floating-point error of the normalizations and products is bounded
  (:func:`gram_iteration_factor`), so the value is certified, not an estimate.
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
* any conv whose operator is small (Gram side up to ``max_dim``): the operator's own Gram
  matrix, assembled from the kernel's channel products (``dense_operator_gram``), certified by
  one float64 Cholesky factorization to within ``rtol`` of the operator norm itself
  (``dense_cholesky_bound``). The only bound here for reflect/replicate padding (the pad map
  duplicates entries: no Fourier blocks), and the tight one on small images, where the
  enlarged circular conv is loose (11% for 512->512 3x3 at 4x4).
* otherwise (a transposed conv with output_padding >= stride, too large for the Gram
  matrix): the Schur test ``sqrt(max row abs-sum * max column abs-sum)`` of the operator,
  from the kernel (loose).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .geometry import conv_padding, output_size

__all__ = ["gram_upper_bound", "circular_gram_bound", "circular_cholesky_bound", "conv_upper_bound",
           "dense_cholesky_bound", "dense_operator_gram", "schur_conv_bound", "operator_norm_bounds"]

_U64, _U32 = 2.0 ** -53, 2.0 ** -24  # unit roundoffs of float64 and float32
# Multiplying a float64 result by this covers the (at most two) roundings of the last sqrt /
# addition that produced it, each by at most u, and the rounding of this product itself.
_ROUND_UP = 1 + 4 * _U64


def _gamma(k: int, u: float = _U64) -> float:
    """Higham's gamma_k = k u / (1 - k u): a sum or inner product of k terms computed in
    floating point is within gamma_k (sum of absolute values) of the exact one, in any order
    (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., Lemma 3.1, eq. 3.4)."""
    if not k * u < 1:
        raise ValueError(f"gamma_{k} is undefined at unit roundoff {u}: {k} terms are too many")
    return k * u / (1 - k * u)


def _power_of_two_scaled(w: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """``(w 2^-e, e)``, in float64, with the largest entry of the first in [0.5, 1) (``e = 0`` for
    an empty or zero ``w``). The scaling is exact (a float32/16 weight, or a float64 one whose
    entries stay normal numbers): the bounds work on the scaled weight, where squares of tiny
    weights cannot underflow nor those of huge ones overflow, and multiply by ``2^e`` at the end."""
    w = w.detach().to(torch.float64)
    scale_exp = int(torch.frexp(w.abs().max())[1]) if w.numel() else 0
    return torch.ldexp(w, torch.tensor(-scale_exp, dtype=torch.int32)), scale_exp


def gram_iteration_factor(shapes: Sequence[Tuple[int, int]], logs: Sequence[float], u: float = _U64,
                          complex_: bool = False) -> float:
    """The factor that makes :func:`gram_upper_bound`'s floating-point Gram iteration a
    certified bound: ``sigma_1(W) <= factor x exp(sum_t log f_t / 2^t)``, for the shapes
    ``(r_t, c)`` of the iterates ``G_0 .. G_n`` (``c`` the smaller side) and the computed
    Frobenius norms ``f_t`` (their logs).

    Derivation (standard model of floating point, Higham ch. 2-3; ``gamma_k`` as in
    :func:`_gamma`). Step ``t``: ``f_t = fl(||G_t||_F)`` is a sum of ``N = r_t c`` squares and a
    sqrt, so ``rho_t = ||G_t||_F / f_t <= 1 / (1 - gamma_{N+1})``; ``H_t = fl(G_t / f_t)`` has
    entrywise relative error ``u``, so ``||H_t - G_t / f_t||_2 <= u rho_t``; ``G_{t+1} =
    fl(H_t^T H_t)`` has ``|E_t| <= gamma_{r_t} |H_t|^T |H_t|`` entrywise, so ``||E_t||_2 <=
    gamma_{r_t} ||H_t||_F^2 <= e_t = gamma_{r_t} ((1 + u) rho_t)^2``. The top singular value of
    the normalized ``H_t`` is at least ``||H_t||_F / sqrt(c) >= l_t = (1 - u) / ((1 + gamma_{N+1})
    sqrt(c))``, which turns both additive errors into relative ones:

        sigma_1(G_t) / f_t <= sigma_1(H_t) (1 + u rho_t / l_t),
        sigma_1(H_t)^2 = sigma_1(H_t^T H_t) <= sigma_1(G_{t+1}) + e_t
                       => sigma_1(H_t)^2 <= sigma_1(G_{t+1}) / (1 - e_t / l_t^2).

    So ``sigma_1(G_t) <= f_t a_t sigma_1(G_{t+1})^(1/2)`` with ``a_t = (1 + u rho_t / l_t) /
    sqrt(1 - e_t / l_t^2)``, and unrolled down to ``sigma_1(G_n) <= ||G_n||_F <= f_n / (1 -
    gamma_{N_n+1})``: ``sigma_1(W) <= prod_t (f_t a_t)^(1/2^t) x (f_n / (1 - gamma))^(1/2^n)``.
    The factor is ``prod_t a_t^(1/2^t) / (1 - gamma)^(1/2^n)`` times ``exp(4 (n + 2) u (S +
    1) + 3u)``, ``S = sum_t |log f_t| / 2^t``: the first term for the rounding of the logs and
    their scaled sum (each a few ulps of the values summed), ``3u`` for the final ``exp``, its
    product with this factor and the rounding of the factor itself. To first order it is ``1 + (r_0 c +
    c^2) u / 2``: 1.9e-9 for a 4096 x 4096 weight, 5e-13 for 64 x 64 (a fixed 1 + 1e-9 is too
    small above about 3000 x 3000).

    Complex iterates (``complex_``, the Fourier blocks of :func:`circular_gram_bound`): the
    Frobenius norm sums ``2N`` real squares (``gamma_{2N+1}``), a complex inner product of
    length ``r`` is within ``sqrt(2) gamma_{r+2} <= 2 gamma_{r+2}`` of the exact one (Higham
    sec. 3.6), and dividing by the real ``f_t`` still errs by at most ``u |z|`` per entry."""
    log_factor, S = 0.0, 0.0
    n = len(shapes) - 1
    for t, ((r, c), log_f) in enumerate(zip(shapes, logs)):
        g = _gamma((2 if complex_ else 1) * r * c + 1, u)
        S += abs(log_f) / 2 ** t
        if t == n:
            log_factor += -math.log1p(-g) / 2 ** t
            break
        rho = 1 / (1 - g)
        low = (1 - u) / ((1 + g) * math.sqrt(c))
        e = (2 * _gamma(r + 2, u) if complex_ else _gamma(r, u)) * ((1 + u) * rho) ** 2
        if not e < low ** 2:
            return math.inf  # the rounding could hide the whole top singular value: no finite bound
        log_factor += (math.log1p(u * rho / low) - 0.5 * math.log1p(-e / low ** 2)) / 2 ** t
    return math.exp(log_factor + 4 * (n + 2) * u * (S + 1) + 3 * u)


def gram_upper_bound(W: torch.Tensor, n_iter: int = 6) -> float:
    """Certified upper bound on sigma_max of a 2-D matrix by ``n_iter`` Gram iterations
    (float64), with the floating-point error of the normalizations and products bounded by
    :func:`gram_iteration_factor` (the weight is first scaled by a power of two, exactly, so
    that tiny weights do not underflow to a zero norm)."""
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise ValueError(f"W must be a 2-D tensor, got {tuple(W.shape) if isinstance(W, torch.Tensor) else W!r}")
    G = W.detach().to(torch.float64)
    if not bool(torch.isfinite(G).all()):
        raise ValueError("W has non-finite entries: no bound")
    if G.numel() == 0 or not bool((G != 0).any()):
        return 0.0
    if G.shape[0] < G.shape[1]:
        G = G.t()
    G, scale_exp = _power_of_two_scaled(G)
    log_scale = 0.0
    shapes, logs = [], []
    for _ in range(n_iter):
        f = torch.linalg.matrix_norm(G, "fro").item()
        shapes.append(tuple(G.shape))
        logs.append(math.log(f))
        G = G / f
        log_scale = 2.0 * (log_scale + math.log(f))
        G = G.t() @ G
    f = torch.linalg.matrix_norm(G, "fro").item()
    shapes.append(tuple(G.shape))
    logs.append(math.log(f))
    raw = math.exp((log_scale + math.log(f)) / 2 ** n_iter)
    return math.ldexp(raw * gram_iteration_factor(shapes, logs), scale_exp)


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
    two iterations, which is what makes the bound affordable on large layers.

    Floating point: each step's value is multiplied by :func:`gram_iteration_factor` (complex
    iterates) and the rounding error of the blocks themselves (:func:`block_rounding_error`)
    is added; a block is dropped only when its inflated upper end is below a lower end."""
    from .fft import circular_blocks

    w = weight.detach().to(torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight has non-finite entries: no bound")
    if w.numel() == 0 or not bool((w != 0).any()):
        return 0.0
    w, scale_exp = _power_of_two_scaled(w)
    P = circular_blocks(w, size, stride, dilation, groups)
    if P.numel() == 0:
        return 0.0
    delta = block_rounding_error(w, stride, dilation, _U64)  # sigma_1(exact block) <= sigma_1(computed) + delta
    tiny = torch.finfo(torch.float64).tiny
    floor = math.log(math.ldexp(lower, -scale_exp) - delta) if lower is not None and \
        math.ldexp(lower, -scale_exp) > delta else -math.inf

    def fro(X):  # (through the real view: matrix_norm on complex measured 3x slower)
        return torch.linalg.vector_norm(torch.view_as_real(X), dim=(1, 2, 3))

    G = P  # G_0; G_1 is the Gram of the smaller side, P P^H or P^H P
    c, k = min(P.shape[1], P.shape[2]), max(P.shape[1], P.shape[2])
    log_scale = torch.zeros(P.shape[0], dtype=torch.float64)
    shapes, logs = [], []
    ub = math.inf
    for t in range(n_iter + 1):
        f = fro(G)
        log_f = torch.log(f)  # -inf for a zero block: its interval is [0, 0]
        shapes.append((k, c) if t == 0 else (c, c))
        logs.append(float(log_f[torch.isfinite(log_f)].abs().max()) if bool(torch.isfinite(log_f).any()) else 0.0)
        # floating-point error of the iteration so far (relative) and of the blocks (absolute)
        log_factor = math.log(gram_iteration_factor(shapes, logs, complex_=True))
        log_hi = (log_scale + log_f) / 2 ** t
        log_lo = (log_scale + log_f - 0.5 * math.log(c)) / 2 ** t
        ub_t = math.ldexp((math.exp(float(log_hi.max()) + log_factor) + delta) * _ROUND_UP, scale_exp)
        ub = min(ub, ub_t)
        best_lo = max(float(log_lo.max()), floor)
        if t == n_iter or (lower is not None and ub <= lower * (1 + rtol)):
            break
        # a block goes only when even its rounding-inflated upper end is below a certified lower end
        keep = log_hi + 2 * log_factor >= best_lo
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


def _gram(P: torch.Tensor) -> torch.Tensor:
    """``P^H P`` or ``P P^H``, whichever is smaller."""
    return P.mH @ P if P.shape[-1] <= P.shape[-2] else P @ P.mH


def _cholesky_fails(H: torch.Tensor, mu2: float, eps: torch.Tensor) -> torch.Tensor:
    """Mask of the blocks whose ``mu2 (1 - eps) I - H`` has no Cholesky factorization (read
    from the upper triangle; the C++ op on CPU, LAPACK/cuSOLVER elsewhere)."""
    from .ops import shifted_cholesky_info, shifted_cholesky_info_reference

    shift = (mu2 * (1 - eps)).to(H.real.dtype)
    # the unblocked C++ test wins while a block's scratch fits in L2; LAPACK's blocked potrf beyond
    test = shifted_cholesky_info if H.shape[-1] <= 256 else shifted_cholesky_info_reference
    return test(H, shift) != 0


def cholesky_margin(n: int, u: float) -> float:
    """Relative margin that a completed floating-point Cholesky factorization of an ``n x n``
    Hermitian ``A`` with ``tr(A) <= n mu^2`` leaves: ``A >= -cholesky_margin(n, u) mu^2 I``.

    Derivation (Demmel 1989; Higham Thm 10.5): the computed factor satisfies ``R^H R = A +
    dA`` with ``|dA| <= g |R^H| |R|`` entrywise, ``g = gamma_{n+1}`` in real arithmetic; for
    complex arithmetic we take ``g = 2 gamma_{n+2}`` (each complex multiply-add errs by at most
    ``sqrt(2) gamma_2``, Higham sec. 3.6), which also covers the real case. Then ``||dA||_2 <=
    g || |R| ||_2^2 <= g ||R||_F^2`` and ``||R||_F^2 = tr(A + dA) <= tr(A) + g ||R||_F^2``, so
    ``||dA||_2 <= g tr(A) / (1 - g) <= g n mu^2 / (1 - g)``; ``R^H R >= 0`` gives ``A >= -dA``.
    (Rump 2006 turns exactly this into a positive-definiteness test.)"""
    g = 2 * _gamma(n + 2, u)
    if not g < 1:
        raise ValueError(f"no Cholesky margin for n={n} at unit roundoff {u}")
    return g * n / (1 - g)


def gram_rounding_coefficient(k: int, u: float) -> float:
    """``||fl(P^H P) - P^H P||_2 <= gram_rounding_coefficient(k, u) ||P||_F^2`` for a complex
    (or real) ``P`` whose Gram has inner dimension ``k``.

    Derivation: each entry is an inner product of length ``k``, within ``sqrt(2) gamma_{k+2}
    |p_i|^T |p_j|`` of the exact one in complex arithmetic (Higham sec. 3.6; ``gamma_k`` for
    real), so ``|dH| <= 2 gamma_{k+2} |P|^H |P|`` entrywise and ``||dH||_2 <= 2 gamma_{k+2} ||
    |P| ||_2^2 <= 2 gamma_{k+2} ||P||_F^2``."""
    return 2 * _gamma(k + 2, u)


def shift_margin(n: int, gram_error: float, mu2: float, u: float) -> float:
    """The relative shift ``eps`` of the Cholesky test: a completed floating-point
    factorization of ``fl(mu2 (1 - eps)) I - H_computed`` (``n x n``, computed at unit
    roundoff ``u``, ``||H_computed - H||_2 <= gram_error``) proves ``H <= mu2 I``.

    Derivation: write ``s = fl(mu2 (1 - eps))`` (``<= mu2 (1 - eps) (1 + 2u)``: the product and
    the cast to the working precision) and ``A`` the matrix actually factored, ``s I - H_c``
    with each diagonal entry rounded once (``<= u mu2``; a diagonal entry above ``s`` makes the
    factorization fail). ``tr(A) <= n mu2``, so :func:`cholesky_margin` gives ``A >= -m mu2 I``,
    ``m = cholesky_margin(n, u)``, hence ``H_c <= (s + u mu2 + m mu2) I`` and ``H <= (s + u
    mu2 + m mu2 + gram_error) I <= mu2 (1 - eps + 3u + m + gram_error / mu2) I``. With ``eps =
    m + gram_error / mu2 + 4u`` the right side is below ``mu2``."""
    return cholesky_margin(n, u) + gram_error / mu2 + 4 * u


def block_rounding_error(weight: torch.Tensor, stride=1, dilation=1, u: float = _U64) -> float:
    """``delta`` with ``||P_computed(w) - P(w)||_2 <= delta`` for every Fourier block of
    :func:`specreg_fast.fft.circular_blocks` (padding 0) built at unit roundoff ``u``
    (``_U64``: float64 weight and GEMM; ``_U32``: weight and twiddles cast to float32, float32
    GEMM).

    Derivation: ``P(w)[o, (c, r)] = sum_t K[o, c, t] E[w, t]`` over the ``T`` taps, with
    twiddles ``E = exp(2 pi i theta)``, ``theta = <w / m, a_t>`` computed in float64: ``d``
    products and a sum (``gamma_{d+1} A`` turns, ``A = sum_i max_t |a_{t,i}| <= sum_i
    dilation_i (k_i - 1) // stride_i``), reduced mod 1 (exact) and scaled by ``2 pi`` (``2u``
    relative), then ``cos``/``sin`` (``u`` each): ``|E_computed - E| <= tau = 2 pi (gamma_{d+1}
    A + 2u) + 2u`` (float64 ``u``). The real and imaginary GEMMs over the taps add
    ``gamma_T sum_t (|Re E| + |Im E|) |K_t| <= sqrt(2) gamma_T sum_t |K_t|``; in float32 the
    cast of ``E`` adds ``sqrt(2) u`` to ``tau`` and the cast of ``K`` ``u |K_t| |E|`` (``<=
    2u |K_t|`` with the GEMM's own error folded in). So each entry errs by at most ``(sqrt(2)
    (gamma_T + tau [+ u]) [+ 2u]) sum_t |K[o, c, t]|``, and ``sum_t |K_t| <= sqrt(T)
    ||K[o, c, :]||``: over all entries ``||dP||_2 <= ||dP||_F <= coefficient x sqrt(T)
    ||W||_F``."""
    from .fft import _tup

    d = weight.dim() - 2
    ks = weight.shape[2:]
    T = math.prod(ks)
    s, dil = _tup(stride, d), _tup(dilation, d)
    A = sum(dil[i] * (ks[i] - 1) // s[i] for i in range(d))
    tau = 2 * math.pi * (_gamma(d + 1) * A + 2 * _U64) + 2 * _U64
    cast = u > _U64  # the weight and the twiddles are rounded to the lower precision
    coef = math.sqrt(2) * (_gamma(T, u) + tau + (u if cast else 0.0)) + (2 * u if cast else 0.0)
    return coef * math.sqrt(T) * float(torch.linalg.vector_norm(weight.detach().double()))


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

    Why this is a certificate (each margin is its own function, with its derivation): a
    Cholesky factorization of ``fl(mu^2 (1 - eps)) I - fl(H)`` that completes in floating point
    proves ``H <= mu^2 I`` when ``eps`` = :func:`shift_margin` (Demmel's backward error of the
    factorization, :func:`cholesky_margin`, with ``tr <= c mu^2``; the rounding of the Gram,
    :func:`gram_rounding_coefficient` x ``||P||_F^2`` with the computed ``||P||_F^2`` rounded
    up by ``1 / (1 - gamma_{4ck+4})``; the shift and the diagonal, ``4u``), each in the
    precision used. The error of ``P`` itself is at most ``delta`` =
    :func:`block_rounding_error` (``delta64`` for float64 blocks, ``delta32`` for float32
    ones): float64 blocks are certified below ``mu``, float32 ones below ``mu + delta64 -
    delta32``, so every exact block is below ``mu + delta64``, returned rounded up
    (``_ROUND_UP``). The weight is first scaled by a power of two (exact), so tiny weights
    cannot underflow. ``rtol`` is the slack that lets the guess pass.

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
    if w.numel() == 0 or not bool((w != 0).any()):
        return 0.0
    w, scale_exp = _power_of_two_scaled(w)
    lower = None if lower is None else math.ldexp(lower, -scale_exp)
    # error of the computed blocks: sigma_1(P_exact) <= sigma_1(P_computed) + delta
    delta64 = block_rounding_error(w, stride, dilation, _U64)
    delta32 = block_rounding_error(w, stride, dilation, _U32)
    # the bulk in complex64 where its Cholesky margin stays small (it grows like c^2 u32)
    use32 = c >= 16 and cholesky_margin(c, _U32) < 2e-2
    P = circular_blocks(w.float() if use32 else w, size, stride, dilation, groups)
    B = P.shape[0]
    fro2 = torch.linalg.vector_norm(torch.view_as_real(P), dim=(1, 2, 3)).double() ** 2  # ||P(w)||_F^2
    # the computed ||P||_F^2 (2ck squares, a sqrt, a square) rounded up to a bound on the true one
    fro2_up = fro2 / (1 - _gamma(4 * c * k + 4, _U32 if use32 else _U64))
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
        eps32 = shift_margin(c, gram_rounding_coefficient(k, _U32) * fro2_up, mu32 ** 2, _U32)
        pending = torch.nonzero(_cholesky_fails(H, mu32 ** 2, eps32)).flatten() if mu32 > 0 else torch.arange(B)
        P64 = blocks64(pending)
        H64 = _gram(P64)
        fro2_64 = torch.linalg.vector_norm(torch.view_as_real(P64), dim=(1, 2, 3)) ** 2 / (1 - _gamma(4 * c * k + 4))
    else:
        pending, H64, fro2_64 = torch.arange(B), H, fro2_up
    slack = (1 + rtol) ** 2
    for _ in range(64):
        if pending.numel() == 0:
            break
        eps64 = shift_margin(c, gram_rounding_coefficient(k, _U64) * fro2_64, mu2, _U64)
        bad = _cholesky_fails(H64, mu2, eps64)
        if not bool(bad.any()):
            break
        # their exact top eigenvalues raise mu; the slack grows if rounding still defeats it
        pending, H64, fro2_64 = pending[bad], H64[bad], fro2_64[bad]
        mu2 = max(mu2, float(torch.linalg.eigvalsh(H64)[:, -1].max()) * slack)
        slack *= slack
    else:  # pragma: no cover - unreachable: the slack doubles in the exponent every round
        raise RuntimeError("Cholesky certificate did not converge")
    return math.ldexp((math.sqrt(mu2) + delta64) * _ROUND_UP, scale_exp)


def _operator_geometry(m: nn.Module, input_shape: Sequence[int]):
    """The layer as a forward conv ``A`` with the layer's weight, for the explicit operator:
    ``(out_spatial, in_spatial, lo, mode)``. For a conv, ``A`` is the layer at
    ``input_shape``; for a transposed conv, ``A`` is its adjoint (the conv from the transposed
    conv's output size back to its input size, same weight, zero padding), whose norm is the
    same. Sizes come from the layer's own conv on the meta device (shapes only; it also
    checks ``input_shape``; the module's hooks do not run)."""
    spatial = tuple(int(s) for s in input_shape[1:])
    x = torch.zeros((1,) + tuple(int(s) for s in input_shape), device="meta")
    w = m.weight.detach().float().to("meta")
    if m.transposed:
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[len(spatial) - 1]
        out = fn(x, w, None, m.stride, m.padding, m.output_padding, m.groups, m.dilation)
    else:
        out = m._conv_forward(x, w, None)
    out_spatial = tuple(out.shape[2:])
    if m.transposed:
        return spatial, out_spatial, tuple(m.padding), "zeros"
    lo, _ = conv_padding(m.padding, m.weight.shape[2:], m.dilation)
    return out_spatial, spatial, lo, m.padding_mode


def _tap_table(out_sizes, in_sizes, kernel, stride, dilation, lo, mode) -> torch.Tensor:
    """``(N_out, T)`` long table: the flat input index that tap ``t`` of output pixel ``o``
    reads (taps and pixels row-major, as ``weight.flatten(2)`` and ``x.flatten(1)``), or -1
    where it reads the zero padding. Reflect/replicate/circular padding map the padded index
    back into the image, so two taps may read the same input."""
    d = len(in_sizes)
    flat, bad = 0, False
    step = 1
    for a in reversed(range(d)):
        o = torch.arange(out_sizes[a])[:, None]
        p = o * stride[a] + torch.arange(kernel[a])[None, :] * dilation[a] - lo[a]
        n = in_sizes[a]
        if mode == "circular":
            p = torch.remainder(p, n)
        elif mode == "reflect":
            p = p.abs()
            p = torch.where(p >= n, 2 * (n - 1) - p, p)
        elif mode == "replicate":
            p = p.clamp(0, n - 1)
        shape = [1] * (2 * d)
        shape[a], shape[d + a] = out_sizes[a], kernel[a]
        flat = flat + (p * step).reshape(shape)
        bad = bad | ((p < 0) | (p >= n)).reshape(shape)
        step *= n
    table = torch.where(bad, torch.full_like(flat, -1), flat)
    return table.reshape(math.prod(out_sizes), math.prod(kernel))


def _join(a_keys: torch.Tensor, b_keys: torch.Tensor):
    """All index pairs ``(i, j)`` with ``a_keys[i] == b_keys[j] >= 0``."""
    ib = torch.nonzero(b_keys >= 0).flatten()
    vb, order = torch.sort(b_keys[ib], stable=True)
    ib = ib[order]
    ia = torch.nonzero(a_keys >= 0).flatten()
    va = a_keys[ia]
    first = torch.searchsorted(vb, va, right=False)
    count = torch.searchsorted(vb, va, right=True) - first
    i = torch.repeat_interleave(ia, count)
    start = torch.repeat_interleave(first - (torch.cumsum(count, 0) - count), count)
    j = ib[start + torch.arange(i.numel())]
    return i, j


def dense_operator_gram(m: nn.Module, input_shape: Sequence[int], weight: Optional[torch.Tensor] = None):
    """The Gram matrix of the conv operator of ``m`` at ``input_shape``, on its smaller side,
    one per group: ``(G, D, D)`` float64, with a bound ``err`` on the 2-norm of its rounding
    error (``||fl(M) - M||_2 <= err``). Any padding mode, stride, dilation, groups,
    Conv1d/2d/3d and transposed convs.

    Built from the kernel, never from the operator: the operator is ``A = sum_t E_t (x) K_t``
    (``E_t`` the 0/1 map of tap ``t`` from input to output pixels, ``K_t`` its channel
    matrix), so ``A^T A = sum_{t,t'} (E_t^T E_t') (x) (K_t^T K_t')``: the ``T^2`` channel
    products come from one GEMM and are added at the pixel pairs where both taps land (the
    same with ``A A^T`` on the output side). For 512->512 3x3 at 4x4 that is 0.02 TFLOP
    against 1.1 TFLOP for ``A^T A`` from the explicit 8192 x 8192 matrix.

    Rounding: every entry is a sum of at most ``k + n`` products of weights (``k`` the GEMM's
    inner dimension, ``n`` the pixel-pair terms added: the count over all entries, an upper
    bound on any one entry's), so ``|fl(M) - M| <= gamma_{k+n} |A|^T |A|`` entrywise (Higham
    Lemma 3.1: the products carry ``gamma_k``, the additions of the ``T^2`` channel products
    into an entry ``gamma`` of their count) with ``|A| <= sum_t E_t (x) |K_t|``, and ``|| |A|
    ||_2^2`` is at most its largest row sum times its largest column sum (Schur), each a sum of
    at most ``T C_in`` / ``T C_out`` non-negative float64 terms, so within ``gamma_{T C_in + 1}``
    / ``gamma_{T C_out + 1}`` of the exact sums: ``err`` divides the product by ``1 -
    gamma_{T (C_in + C_out) + 4}`` (the two sums, their product and this division).

    ``weight`` replaces ``m.weight`` (same shape), e.g. a copy rescaled by a power of two."""
    out_sp, in_sp, lo, mode = _operator_geometry(m, input_shape)
    w = (m.weight if weight is None else weight).detach().to(torch.float64).cpu()
    G = m.groups
    co, ci = w.shape[0] // G, w.shape[1]
    kernel = tuple(w.shape[2:])
    T = math.prod(kernel)
    K = w.reshape(G, co, ci, T).permute(0, 3, 1, 2)  # (G, T, co, ci): K_t
    table = _tap_table(out_sp, in_sp, kernel, m.stride, m.dilation, lo, mode)
    n_out, n_in = table.shape[0], math.prod(in_sp)
    absK = K.abs()
    # Schur bound on || |A| ||_2^2: max row sum x max column sum of sum_t E_t (x) |K_t|
    valid = (table >= 0).to(torch.float64)  # (n_out, T)
    rows = torch.einsum("ot,gtc->goc", valid, absK.sum(3))
    hits = torch.zeros(T, n_in, dtype=torch.float64)
    for t in range(T):
        sel = table[:, t][table[:, t] >= 0]
        hits[t].index_add_(0, sel, torch.ones(sel.numel(), dtype=torch.float64))
    cols = torch.einsum("ti,gtc->gic", hits, absK.sum(2))
    abs_norm2 = float(rows.amax()) * float(cols.amax()) / (1 - _gamma(T * (ci + co) + 4))
    input_side = ci * n_in <= co * n_out
    if input_side:  # M = A^T A: pixel pairs (i, i') read by taps (t, t') of one output pixel
        c, n = ci, n_in
        Kf = K.permute(0, 2, 1, 3).reshape(G, co, T * ci)
        Q = (Kf.mT @ Kf).view(G, T, ci, T, ci)  # Q[t, :, t', :] = K_t^T K_t'
        inner = co
    else:  # M = A A^T: pixel pairs (o, o') whose taps (t, t') read the same input pixel
        c, n = co, n_out
        Kf = K.reshape(G, T * co, ci)
        Q = (Kf @ Kf.mT).view(G, T, co, T, co)  # K_t K_t'^T
        inner = ci
    M = torch.zeros(n * n, G, c, c, dtype=torch.float64)
    terms = 0
    for t in range(T):
        for t2 in range(T):
            if input_side:
                ok = (table[:, t] >= 0) & (table[:, t2] >= 0)
                a, b = table[ok, t], table[ok, t2]
            else:
                a, b = _join(table[:, t], table[:, t2])
            if a.numel():
                M.index_add_(0, a * n + b, Q[:, t, :, t2, :].unsqueeze(0).expand(a.numel(), G, c, c))
                terms += a.numel()
    M = M.view(n, n, G, c, c).permute(2, 0, 3, 1, 4).reshape(G, n * c, n * c)
    err = _gamma(inner + terms) * abs_norm2
    return M, err


def dense_cholesky_bound(m: nn.Module, input_shape: Sequence[int], lower: Optional[float] = None,
                         rtol: float = 1e-3, max_dim: int = 8192) -> float:
    """Certified upper bound on the operator norm of conv ``m`` at ``input_shape`` from its
    exact Gram matrix (:func:`dense_operator_gram`): a float64 Cholesky factorization of
    ``mu^2 (1 - eps) I - M`` per group that completes certifies ``sigma <= mu``, the
    floating-point errors of ``M`` and of the factorization folded into ``eps`` as in
    :func:`circular_cholesky_bound`. ``mu`` = ``(1 + rtol) lower`` (``lower`` from the power
    iteration when not given); a failed test raises the slack and tries again.

    This is the bound for small operators, where the circular conv that contains a
    zero-padded layer is loose (a 4x4 image is mostly border: 11% above the operator's norm
    for 512->512 3x3) and for reflect/replicate padding, which has no Fourier bound; its cost is
    one Cholesky factorization of the Gram's side ``D`` (about ``D^3 / 3`` flops: 2.3 s at
    ``D = 8192`` on this project's 2-core machine), so ``D`` is capped by ``max_dim``.
    The weight is first scaled by a power of two (exact, undone at the end), so the Gram of
    tiny weights cannot underflow (a 1e-200 weight's squares are 0 in float64)."""
    from .conv import conv_operator_norm
    from .ops import shifted_cholesky_info_reference

    if not isinstance(rtol, (int, float)) or not rtol > 0:
        raise ValueError(f"rtol must be a positive number, got {rtol!r}")
    dim = dense_gram_dim(m, input_shape)
    if dim > max_dim:
        raise ValueError(f"the Gram matrix of this operator is {dim} x {dim}, above max_dim={max_dim}: the dense "
                         f"certificate would factor it (D^3/3 flops); raise max_dim to allow it")
    w = m.weight.detach()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight has non-finite entries: no bound")
    w64, scale_exp = _power_of_two_scaled(w)
    M, err = dense_operator_gram(m, input_shape, weight=w64)
    if M.numel() == 0 or float(M.diagonal(dim1=1, dim2=2).abs().max()) == 0.0:
        return 0.0
    if lower is None:  # the guess, from the power step in the weight's dtype, where it would underflow unscaled
        lower = float(conv_operator_norm(m, tuple(input_shape), tol=1e-7, weight=w64.to(w.dtype)).detach())
    else:
        lower = math.ldexp(lower, -scale_exp)
    D = M.shape[-1]
    # ||M||_F / sqrt(D) <= lambda_max keeps mu positive for a non-zero operator
    floor2 = float(torch.linalg.matrix_norm(M).max()) / math.sqrt(D)
    mu2 = max(lower ** 2, floor2, err) * (1 + rtol) ** 2
    slack = (1 + rtol) ** 2
    for _ in range(64):
        # Demmel's margin for the factorization, the Gram's rounding and the shifted diagonal
        eps = shift_margin(D, err, mu2, _U64)
        shift = torch.full((M.shape[0],), mu2 * (1 - eps), dtype=M.dtype)
        if not bool(shifted_cholesky_info_reference(M, shift).any()):  # every group factored
            return math.ldexp(math.sqrt(mu2) * _ROUND_UP, scale_exp)
        # lower was short of the norm: widen the slack (squared each time, so few retries)
        mu2 *= slack
        slack *= slack
    raise RuntimeError("dense Cholesky certificate did not converge")  # pragma: no cover


def dense_gram_dim(m: nn.Module, input_shape: Sequence[int]) -> int:
    """Side of the per-group Gram matrix :func:`dense_operator_gram` builds:
    ``min(C_in/g x input pixels, C_out/g x output pixels)`` of the (adjoint) operator."""
    out_sp, in_sp, _, _ = _operator_geometry(m, input_shape)
    co, ci = m.weight.shape[0] // m.groups, m.weight.shape[1]
    return min(ci * math.prod(in_sp), co * math.prod(out_sp))


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
    # float64 sums of n0 and n1 non-negative terms are within gamma_n of the exact ones; their
    # product, the sqrt and the division each round once
    n0, n1 = a[0].numel(), a[:, 0].numel()
    return float(torch.sqrt(s0 * s1)) / (1 - _gamma(n0 + n1 + 4))




def conv_upper_bound(m: nn.Module, input_shape: Sequence[int], n_iter: int = 8, lower: Optional[float] = None,
                     rtol: float = 1e-3, method: str = "auto", max_dim: int = 4096, refine_gap: float = 0.05) -> float:
    """Certified upper bound on the operator norm of conv ``m`` at ``input_shape``.

    ``method``:
      * ``"cholesky"``: the Fourier blocks of a circular conv that contains the operator (see
        the module docstring for which one), certified to within ``rtol`` of that circular
        norm (:func:`circular_cholesky_bound`); zeros and circular padding only.
      * ``"gram"``: ``n_iter`` Gram iterations on the same blocks (:func:`circular_gram_bound`,
        stopping early within ``rtol`` of ``lower``).
      * ``"dense"``: the operator's own Gram matrix, certified to within ``rtol`` of the
        operator norm (:func:`dense_cholesky_bound`); any padding mode, for operators whose
        Gram side is at most ``max_dim`` (default 4096: about 0.7 s here; 8192, e.g.
        512->512 3x3 at 4x4, takes about 5 s).
      * ``"auto"`` (default): ``"cholesky"``; then, when ``lower`` is given and the bound is
        more than ``refine_gap`` above it (small images: the circular conv is loose on a
        border-heavy image) and the Gram side is at most ``max_dim``, the smaller of it and
        ``"dense"``. Reflect/replicate padding (no circular bound) and the cases the circular
        route cannot take (circular padding with a stride that does not divide the size, a
        transposed conv with ``output_padding >= stride``) go to ``"dense"`` within
        ``max_dim``; beyond it the Schur test where it applies, else a ValueError."""
    if not isinstance(m, nn.modules.conv._ConvNd):
        raise TypeError(f"expected a conv module, got {type(m).__name__}")
    if method not in ("auto", "cholesky", "gram", "dense"):
        raise ValueError(f"method must be 'auto', 'cholesky', 'gram' or 'dense', got {method!r}")
    if method == "dense":
        return dense_cholesky_bound(m, input_shape, lower=lower, rtol=rtol, max_dim=max_dim)
    ub = _circular_route_bound(m, input_shape, n_iter, lower, rtol, method)
    if method != "auto":
        if ub is None:
            raise ValueError(f"no Fourier bound for padding_mode={m.padding_mode!r} here (the padding map "
                             f"duplicates entries, or the stride does not divide the size): use method='dense'")
        return ub
    small = dense_gram_dim(m, input_shape) <= max_dim
    if ub is None or ub == math.inf:
        if small:
            return dense_cholesky_bound(m, input_shape, lower=lower, rtol=rtol, max_dim=max_dim)
        if ub is None:
            raise ValueError(f"no certified upper bound for padding_mode={m.padding_mode!r} at this size: the "
                             f"padding map duplicates entries (no Fourier bound) and the operator's Gram matrix "
                             f"is above max_dim={max_dim} (raise it for the dense certificate)")
        return schur_conv_bound(m)
    if lower is not None and ub > lower * (1 + refine_gap) and small:
        ub = min(ub, dense_cholesky_bound(m, input_shape, lower=lower, rtol=rtol, max_dim=max_dim))
    return ub


def _circular_route_bound(m, input_shape, n_iter, lower, rtol, method) -> Optional[float]:
    """The Fourier-block bound of ``conv_upper_bound``; None where there is none, inf where
    only the Schur test applies (transposed conv with ``output_padding >= stride``)."""
    spatial = tuple(int(s) for s in input_shape[1:])
    w = m.weight.detach().double()
    d = len(spatial)
    if method == "gram":
        circular_bound, kw = circular_gram_bound, dict(n_iter=n_iter, lower=lower, rtol=rtol)
    else:
        circular_bound, kw = circular_cholesky_bound, dict(lower=lower, rtol=rtol)
    if method != "gram" and all(k == 1 for k in w.shape[2:]) and m.padding_mode in ("zeros", "circular"):
        # a 1x1 conv (any stride, padding, transposed or not) applies W_g at every pixel it
        # keeps: its norm is max_g ||W_g||, the circular conv with this kernel at size 1
        return circular_bound(w, (1,) * d, 1, 1, m.groups, **kw)
    if m.padding_mode == "circular" and not m.transposed and all(n % s == 0 for n, s in zip(spatial, m.stride)):
        return circular_bound(w, spatial, m.stride, m.dilation, m.groups, **kw)
    if m.padding_mode == "zeros":
        if m.transposed:
            # the adjoint of the conv with this weight at the transposed conv's output size
            if any(op >= s for op, s in zip(m.output_padding, m.stride)):
                return math.inf
            lo = hi = tuple(m.padding)
            size = [output_size(spatial[i], w.shape[2 + i], m.stride[i], m.dilation[i], lo[i], hi[i],
                                m.output_padding[i], transposed=True) for i in range(d)]
        else:
            size = list(spatial)
            lo, hi = conv_padding(m.padding, m.weight.shape[2:], m.dilation)
        N = [-(-(size[i] + lo[i] + hi[i]) // m.stride[i]) * m.stride[i] for i in range(d)]
        return circular_bound(w, N, m.stride, m.dilation, m.groups, **kw)
    return None


def operator_norm_bounds(layer: Union[nn.Module, torch.Tensor], input_shape: Optional[Sequence[int]] = None,
                         n_iter: int = 6, power_tol: float = 1e-6, max_dim: int = 4096) -> Tuple[float, float, float]:
    """``(lower, upper, relative gap)`` for a 2-D weight, an ``nn.Linear`` or a conv module at
    ``input_shape`` (``(C_in, *spatial)``; required for convs). Dense: ``n_iter`` Gram
    iterations. Convs: :func:`conv_upper_bound` with ``method="auto"``: the Cholesky
    certificate on the Fourier blocks of the circular conv that contains the operator
    (within 1e-3 of that circular norm), refined by the operator's own Gram matrix when that
    is more than 5% above the lower bound and its side is at most ``max_dim``; reflect and
    replicate padding take the Gram matrix directly."""
    from .conv import conv_operator_norm
    from .dense import spectral_norm

    if isinstance(layer, nn.modules.conv._ConvNd):
        if input_shape is None:
            raise ValueError(f"input_shape (C_in, *spatial) is required for a {type(layer).__name__}")
        # the power steps on the weight scaled by a power of two: unscaled, W^T W v of a tiny
        # weight underflows to a zero estimate
        w, scale_exp = _power_of_two_scaled(layer.weight)
        lower = math.ldexp(float(conv_operator_norm(layer, input_shape, tol=power_tol,
                                                    weight=w.to(layer.weight.dtype)).detach()), scale_exp)
        upper = conv_upper_bound(layer, input_shape, lower=lower, max_dim=max_dim)
    else:
        W = layer.weight if isinstance(layer, nn.Linear) else layer
        if not isinstance(W, torch.Tensor) or W.dim() != 2:
            raise TypeError("layer must be an nn.Linear, a conv module or a 2-D tensor")
        if not bool(torch.isfinite(W.detach()).all()):
            name = "the nn.Linear's weight" if isinstance(layer, nn.Linear) else "the 2-D weight"
            raise ValueError(f"{name} has non-finite entries (NaN or inf): no bound")
        w, scale_exp = _power_of_two_scaled(W)
        lower = math.ldexp(float(spectral_norm(w.to(W.dtype), tol=power_tol)), scale_exp)
        upper = gram_upper_bound(W, n_iter)
    gap = (upper - lower) / upper if upper > 0 else 0.0
    return lower, upper, gap

"""Triton power iteration on a stack of small matrices P (B x m x n, real or complex).

This is the form the Fourier-domain conv norm needs: one complex c_out x (c_in*stride^2)
block per frequency, thousands of blocks. One program per block runs all ``n_iter``
iterations inside the kernel:

    u <- P v / |P v|,   v <- P^H u / |P^H u|   (= P^H P v / |P^H P v|)

and returns ``sigma_b = |P v|`` at the final v, with the updated u and v. A block whose
``P v`` or ``P^H P v`` is zero keeps its vectors (sigma 0), as the dense op does.

Two forms, chosen per launch by a constexpr:

* RESIDENT (m_pad * n_pad <= RESIDENT_MAX): the whole block is loaded into registers once;
  every iteration runs from registers.
* chunked (bigger blocks, e.g. 512 x 1024 for a stride-2 layer4 conv): each iteration streams
  the block in BLOCK_M-row chunks, forming P v and P^H (P v) in the same sweep (one read of
  P per iteration, which is L2-resident for repeated iterations); v and P^H P v stay in
  registers, P v goes to a small scratch buffer.

Complex tensors are read as interleaved (re, im) float32 pairs (``torch.view_as_real``), no
copy.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

__all__ = ["batched_power_iteration", "batched_power_reference", "launch_params", "RESIDENT_MAX"]

RESIDENT_MAX = 8192  # elements of the padded block kept in registers (x2 for complex)
CHUNK_ELEMS = 4096   # elements of a streamed chunk


@triton.jit
def _cmatvec(pr, pi, vr, vi, COMPLEX: tl.constexpr):
    # t = P v (rows): P tile [BM, BN], v [BN]
    if COMPLEX:
        tr = tl.sum(pr * vr[None, :] - pi * vi[None, :], axis=1)
        ti = tl.sum(pr * vi[None, :] + pi * vr[None, :], axis=1)
    else:
        tr = tl.sum(pr * vr[None, :], axis=1)
        ti = tr * 0.0
    return tr, ti


@triton.jit
def _cmatvec_h(pr, pi, tr, ti, COMPLEX: tl.constexpr):
    # a = P^H t (columns): conj(P)^T t
    if COMPLEX:
        ar = tl.sum(pr * tr[:, None] + pi * ti[:, None], axis=0)
        ai = tl.sum(pr * ti[:, None] - pi * tr[:, None], axis=0)
    else:
        ar = tl.sum(pr * tr[:, None], axis=0)
        ai = ar * 0.0
    return ar, ai


@triton.jit
def _batched_power_kernel(p_ptr, u_ptr, v_ptr, t_ptr, sigma_ptr, m, n, n_iter, s_pb, s_pm, s_pn,
                          COMPLEX: tl.constexpr, RESIDENT: tl.constexpr, M_PAD: tl.constexpr,
                          N_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    # p_ptr:     fp32 P, (B, m, n) or its view_as_real (B, m, n, 2); strides s_p* in float32 units
    # u_ptr:     fp32 (B, m[, 2]) left vectors, in/out;  v_ptr: fp32 (B, n[, 2]) right vectors, in/out
    # t_ptr:     fp32 (B, m[, 2]) scratch for P v (chunked form only)
    # sigma_ptr: fp32 (B,) |P v| at the final v
    # A complex element is (re, im) at offsets (0, 1).
    b = tl.program_id(0).to(tl.int64)
    C: tl.constexpr = 2 if COMPLEX else 1
    cols = tl.arange(0, N_PAD)
    cmask = cols < n
    pb = p_ptr + b * s_pb
    vb = v_ptr + b * n * C
    ub = u_ptr + b * m * C
    vr = tl.load(vb + cols * C, mask=cmask, other=0.0)
    if COMPLEX:
        vi = tl.load(vb + cols * C + 1, mask=cmask, other=0.0)
    else:
        vi = vr * 0.0
    if RESIDENT:
        rows = tl.arange(0, M_PAD)
        rmask = rows < m
        msk = rmask[:, None] & cmask[None, :]
        offs = rows[:, None] * s_pm + cols[None, :] * s_pn
        pr = tl.load(pb + offs, mask=msk, other=0.0)
        if COMPLEX:
            pi = tl.load(pb + offs + 1, mask=msk, other=0.0)
        else:
            pi = pr * 0.0
        ur = tl.load(ub + rows * C, mask=rmask, other=0.0)
        if COMPLEX:
            ui = tl.load(ub + rows * C + 1, mask=rmask, other=0.0)
        else:
            ui = ur * 0.0
        for _ in range(0, n_iter):
            tr, ti = _cmatvec(pr, pi, vr, vi, COMPLEX)
            tn = tl.sqrt(tl.sum(tr * tr + ti * ti, axis=0))
            ar, ai = _cmatvec_h(pr, pi, tr, ti, COMPLEX)
            an = tl.sqrt(tl.sum(ar * ar + ai * ai, axis=0))
            ok = (tn > 0.0) & (an > 0.0)
            itn = tl.where(ok, 1.0 / tn, 0.0)
            ian = tl.where(ok, 1.0 / an, 0.0)
            ur = tl.where(ok, tr * itn, ur)
            ui = tl.where(ok, ti * itn, ui)
            vr = tl.where(ok, ar * ian, vr)
            vi = tl.where(ok, ai * ian, vi)
        tr, ti = _cmatvec(pr, pi, vr, vi, COMPLEX)
        sig = tl.sqrt(tl.sum(tr * tr + ti * ti, axis=0))
        tl.store(ub + rows * C, ur, mask=rmask)
        if COMPLEX:
            tl.store(ub + rows * C + 1, ui, mask=rmask)
    else:
        tb = t_ptr + b * m * C
        r0 = tl.arange(0, BLOCK_M)
        for _ in range(0, n_iter):
            ar = tl.zeros([N_PAD], dtype=tl.float32)
            ai = tl.zeros([N_PAD], dtype=tl.float32)
            tsq = tl.zeros([BLOCK_M], dtype=tl.float32)
            for i0 in range(0, m, BLOCK_M):
                rows = i0 + r0
                rmask = rows < m
                msk = rmask[:, None] & cmask[None, :]
                offs = rows[:, None] * s_pm + cols[None, :] * s_pn
                pr = tl.load(pb + offs, mask=msk, other=0.0)
                if COMPLEX:
                    pi = tl.load(pb + offs + 1, mask=msk, other=0.0)
                else:
                    pi = pr * 0.0
                tr, ti = _cmatvec(pr, pi, vr, vi, COMPLEX)
                tsq += tr * tr + ti * ti
                dar, dai = _cmatvec_h(pr, pi, tr, ti, COMPLEX)
                ar += dar
                ai += dai
                tl.store(tb + rows * C, tr, mask=rmask)
                if COMPLEX:
                    tl.store(tb + rows * C + 1, ti, mask=rmask)
            tn = tl.sqrt(tl.sum(tsq, axis=0))
            an = tl.sqrt(tl.sum(ar * ar + ai * ai, axis=0))
            ok = (tn > 0.0) & (an > 0.0)
            if ok:
                itn = 1.0 / tn
                for i0 in range(0, m, BLOCK_M):
                    rows = i0 + r0
                    rmask = rows < m
                    tl.store(ub + rows * C, tl.load(tb + rows * C, mask=rmask) * itn, mask=rmask)
                    if COMPLEX:
                        tl.store(ub + rows * C + 1, tl.load(tb + rows * C + 1, mask=rmask) * itn, mask=rmask)
                vr = ar / an
                vi = ai / an
        tsq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for i0 in range(0, m, BLOCK_M):
            rows = i0 + r0
            rmask = rows < m
            msk = rmask[:, None] & cmask[None, :]
            offs = rows[:, None] * s_pm + cols[None, :] * s_pn
            pr = tl.load(pb + offs, mask=msk, other=0.0)
            if COMPLEX:
                pi = tl.load(pb + offs + 1, mask=msk, other=0.0)
            else:
                pi = pr * 0.0
            tr, ti = _cmatvec(pr, pi, vr, vi, COMPLEX)
            tsq += tr * tr + ti * ti
        sig = tl.sqrt(tl.sum(tsq, axis=0))
    tl.store(vb + cols * C, vr, mask=cmask)
    if COMPLEX:
        tl.store(vb + cols * C + 1, vi, mask=cmask)
    tl.store(sigma_ptr + b, sig)


def launch_params(m: int, n: int, is_complex: bool) -> dict:
    """Constexprs and warps for an m x n block (shared with the AOT test)."""
    m_pad = triton.next_power_of_2(max(m, 1))
    n_pad = triton.next_power_of_2(max(n, 1))
    resident = m_pad * n_pad <= RESIDENT_MAX
    block_m = m_pad if resident else max(1, min(m_pad, CHUNK_ELEMS // (n_pad * (2 if is_complex else 1))))
    tile = (m_pad if resident else block_m) * n_pad * (2 if is_complex else 1)
    num_warps = 1 if tile <= 512 else 2 if tile <= 2048 else 4 if tile <= 4096 else 8
    return dict(COMPLEX=is_complex, RESIDENT=resident, M_PAD=m_pad, N_PAD=n_pad, BLOCK_M=block_m,
                num_warps=num_warps)


def batched_power_iteration(P: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n_iter: int
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n_iter`` power iterations on every block of ``P`` (B, m, n; float32 or complex64)
    in one launch. ``u`` (B, m) and ``v`` (B, n), of P's dtype and contiguous, are updated in
    place. Returns ``(sigma, u, v)`` with ``sigma`` (B,) float32 = |P_b v_b| at the final v."""
    if P.dim() != 3:
        raise ValueError(f"P: expected a (B, m, n) stack, got shape {tuple(P.shape)}")
    if P.dtype not in (torch.float32, torch.complex64):
        raise TypeError(f"P: expected float32 or complex64, got {P.dtype}")
    B, m, n = P.shape
    for vec, name, size in ((u, "u", m), (v, "v", n)):
        if vec.shape != (B, size) or vec.dtype != P.dtype or not vec.is_contiguous() or vec.device != P.device:
            raise ValueError(f"{name}: expected a contiguous ({B}, {size}) {P.dtype} tensor on {P.device}, got "
                             f"{tuple(vec.shape)} {vec.dtype} on {vec.device}")
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    sigma = torch.zeros(B, dtype=torch.float32, device=P.device)
    if B == 0 or m == 0 or n == 0:
        return sigma, u, v
    cplx = P.is_complex()
    Pf = torch.view_as_real(P) if cplx else P
    uf = torch.view_as_real(u) if cplx else u
    vf = torch.view_as_real(v) if cplx else v
    prm = launch_params(m, n, cplx)
    t = torch.empty(1 if prm["RESIDENT"] else B * m * (2 if cplx else 1), dtype=torch.float32, device=P.device)
    nw = prm.pop("num_warps")
    _batched_power_kernel[(B,)](Pf, uf, vf, t, sigma, m, n, int(n_iter), Pf.stride(0), Pf.stride(1), Pf.stride(2),
                                num_warps=nw, **prm)
    return sigma, u, v


def batched_power_reference(P: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n_iter: int
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-PyTorch truth of :func:`batched_power_iteration` (returns new tensors)."""
    u, v = u.clone(), v.clone()
    for _ in range(n_iter):
        t = torch.einsum("bmn,bn->bm", P, v)
        a = torch.einsum("bmn,bm->bn", P.conj(), t)
        tn = torch.linalg.vector_norm(t, dim=1, keepdim=True)
        an = torch.linalg.vector_norm(a, dim=1, keepdim=True)
        ok = (tn > 0) & (an > 0)
        u = torch.where(ok, t / torch.where(ok, tn, 1), u)
        v = torch.where(ok, a / torch.where(ok, an, 1), v)
    sigma = torch.linalg.vector_norm(torch.einsum("bmn,bn->bm", P, v), dim=1).to(torch.float32)
    return sigma, u, v

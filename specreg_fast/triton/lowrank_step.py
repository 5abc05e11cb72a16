"""Triton kernels of ``specreg_fast::lowrank_power_step_``: the grouped power step of low-rank maps
``M = W + s B A`` (LoRA), the matrix never built, each step reading W once.

The layout follows the dense kernels (:mod:`specreg_fast.triton.power_step`): one int64 table
row per map, whose first fields are those of the dense table (so the dense
``_reduce_partials_kernel`` and ``_finalize_kernel`` serve unchanged), followed by the factors'
pointers, the rank and two offsets; program ``pid`` of the row kernel owns one row block of
``BLOCK_M`` rows of one map. A step is five launches, none synchronizing with the host:

1. ``_lowrank_z_kernel`` (one program per map): ``z = s A v`` (r values).
2. ``_lowrank_rows_kernel``: per row block, ``t_B = W_B v + B_B z`` (= ``M_B v``), the partial
   ``W_B^T t_B`` (as the dense kernel, the second touch of the block from L1/L2) and the partial
   ``B_B^T t_B`` (r values), both to per-row-block buffers (fixed-order sums, no atomics).
3. the dense ``_reduce_partials_kernel``: ``a = W^T t``.
4. ``_lowrank_adjoint_kernel``: ``y = B^T t`` (the r-partials summed in order), ``a += s A^T y``.
5. the dense ``_finalize_kernel``: u, v, the estimate ``|a|/|t|`` and the op's conventions.

Float32 accumulation; W float32/bfloat16/float16, the factors converted to float32 (r (m + n)
values) once per call. Float64 maps take the reference (the backend layer), as the dense ops.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import triton
import triton.language as tl

from . import power_step as ps

__all__ = ["lowrank_power_step_", "r_block"]

# Table fields: the dense ones (ps: w, m, n, sm, sn, u, v, t_off, a_off, p_off, tile0), then
# A (fp32 (r, n) contiguous), B (fp32 (m, r) contiguous), r, y_off (per-row-block B^T t
# partials), z_off (z of the map, r values).
_F_A, _F_B, _F_R, _F_YOFF, _F_ZOFF = range(ps._NF, ps._NF + 5)
_NF = ps._NF + 5
# Columns per chunk of the z kernel, whatever the config: its tile is R_BLOCK x Z_BLOCK_N fp32
# (rank 64: 2048 values, 16 registers a thread at 4 warps; BLOCK_N 256 spilled at sm_90).
Z_BLOCK_N = 32


def r_block(r: int) -> int:
    """The (power of 2) tile width that holds a rank ``r``."""
    return max(2, triton.next_power_of_2(max(r, 1)))


@triton.jit
def _lowrank_z_kernel(tab_ptr, flags_ptr, scale_ptr, z_ptr, NF: tl.constexpr, R_BLOCK: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    layer = tl.program_id(0)
    row = tab_ptr + layer * NF
    if tl.load(flags_ptr + layer) != 0:
        n = tl.load(row + 2)
        v = tl.load(row + 6).to(tl.pointer_type(tl.float32))
        A = tl.load(row + 11).to(tl.pointer_type(tl.float32))
        r = tl.load(row + 13)
        z_off = tl.load(row + 15)
        ks = tl.arange(0, R_BLOCK)
        kmask = ks < r
        cols0 = tl.arange(0, BLOCK_N)
        acc = tl.zeros([R_BLOCK, BLOCK_N], dtype=tl.float32)
        for c0 in range(0, n, BLOCK_N):
            cols = c0 + cols0
            cmask = cols < n
            at = tl.load(A + ks[:, None] * n + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc += at * tl.load(v + cols, mask=cmask, other=0.0)[None, :]
        s = tl.load(scale_ptr + layer)
        tl.store(z_ptr + z_off + ks, tl.sum(acc, axis=1) * s, mask=kmask)


@triton.jit
def _lowrank_rows_kernel(tab_ptr, tile_layer_ptr, flags_ptr, z_ptr, t_ptr, part_ptr, ypart_ptr,
                         W_DTYPE: tl.constexpr, NF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         R_BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    layer = tl.load(tile_layer_ptr + pid)
    row = tab_ptr + layer * NF
    if tl.load(flags_ptr + layer) != 0:
        w = tl.load(row + 0).to(tl.pointer_type(W_DTYPE))
        m = tl.load(row + 1)
        n = tl.load(row + 2)
        sm = tl.load(row + 3)
        sn = tl.load(row + 4)
        v = tl.load(row + 6).to(tl.pointer_type(tl.float32))
        t_off = tl.load(row + 7)
        p_off = tl.load(row + 9)
        rb = pid - tl.load(row + 10)
        B = tl.load(row + 12).to(tl.pointer_type(tl.float32))
        r = tl.load(row + 13)
        y_off = tl.load(row + 14)
        z_off = tl.load(row + 15)
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < m
        ks = tl.arange(0, R_BLOCK)
        kmask = ks < r
        cols0 = tl.arange(0, BLOCK_N)
        t = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c0 in range(0, n, BLOCK_N):
            cols = c0 + cols0
            cmask = cols < n
            wt = tl.load(w + rows[:, None] * sm + cols[None, :] * sn, mask=rmask[:, None] & cmask[None, :],
                         other=0.0).to(tl.float32)
            t += tl.sum(wt * tl.load(v + cols, mask=cmask, other=0.0)[None, :], axis=1)
        bt = tl.load(B + rows[:, None] * r + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        zz = tl.load(z_ptr + z_off + ks, mask=kmask, other=0.0)
        t += tl.sum(bt * zz[None, :], axis=1)
        tl.store(t_ptr + t_off + rows, t, mask=rmask)
        tl.store(ypart_ptr + y_off + rb * r + ks, tl.sum(bt * t[:, None], axis=0), mask=kmask)
        # second touch of the row block: from L1/L2
        for c0 in range(0, n, BLOCK_N):
            cols = c0 + cols0
            cmask = cols < n
            wt = tl.load(w + rows[:, None] * sm + cols[None, :] * sn, mask=rmask[:, None] & cmask[None, :],
                         other=0.0).to(tl.float32)
            tl.store(part_ptr + p_off + rb * n + cols, tl.sum(wt * t[:, None], axis=0), mask=cmask)


@triton.jit
def _lowrank_adjoint_kernel(tab_ptr, flags_ptr, scale_ptr, ypart_ptr, a_ptr, NF: tl.constexpr,
                            ROWS_PER_PART: tl.constexpr, R_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
                            PARTS: tl.constexpr):
    # y = B^T t (the row blocks' r-partials summed in a fixed order), then a += s A^T y on this
    # program's BLOCK columns.
    layer = tl.program_id(0)
    cb = tl.program_id(1)
    row = tab_ptr + layer * NF
    n = tl.load(row + 2)
    if (tl.load(flags_ptr + layer) != 0) & (cb * BLOCK < n):
        m = tl.load(row + 1)
        a_off = tl.load(row + 8)
        A = tl.load(row + 11).to(tl.pointer_type(tl.float32))
        r = tl.load(row + 13)
        y_off = tl.load(row + 14)
        nparts = (m + ROWS_PER_PART - 1) // ROWS_PER_PART
        ks = tl.arange(0, R_BLOCK)
        kmask = ks < r
        pr = tl.arange(0, PARTS)
        yacc = tl.zeros([PARTS, R_BLOCK], dtype=tl.float32)
        for p0 in range(0, nparts, PARTS):
            pp = p0 + pr
            yacc += tl.load(ypart_ptr + y_off + pp[:, None] * r + ks[None, :],
                            mask=(pp < nparts)[:, None] & kmask[None, :], other=0.0)
        y = tl.sum(yacc, axis=0) * tl.load(scale_ptr + layer)
        cols = cb * BLOCK + tl.arange(0, BLOCK)
        cmask = cols < n
        at = tl.load(A + ks[:, None] * n + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
        a = tl.load(a_ptr + a_off + cols, mask=cmask, other=0.0)
        tl.store(a_ptr + a_off + cols, a + tl.sum(at * y[:, None], axis=0), mask=cmask)


class _Plan:
    """Table and work buffers of one W-dtype group of maps for one config."""

    def __init__(self, weights, As, Bs, scales, us, vs, cfg):
        self.cfg = cfg
        dev = weights[0].device
        bm = cfg["BLOCK_M"]
        self.keep = []  # the float32 factors the table points to
        rows: List[int] = []
        tile_layer: List[int] = []
        t_off = a_off = p_off = y_off = z_off = 0
        for l, (W, A, B, u, v) in enumerate(zip(weights, As, Bs, us, vs)):
            m, n = W.shape
            r = A.shape[0]
            A32 = A.detach().to(torch.float32).contiguous()
            B32 = B.detach().to(torch.float32).contiguous()
            self.keep += [A32, B32]
            ntiles = -(-m // bm) if n > 0 else 0
            rows += [W.data_ptr(), m, n, W.stride(0), W.stride(1), u.data_ptr(), v.data_ptr(), t_off, a_off, p_off,
                     len(tile_layer), A32.data_ptr(), B32.data_ptr(), r, y_off, z_off]
            tile_layer += [l] * ntiles
            t_off += m
            a_off += n
            p_off += ntiles * n
            y_off += ntiles * r
            z_off += r
        self.L = len(weights)
        self.ntiles = len(tile_layer)
        self.max_n = max((w.shape[1] for w in weights), default=0)
        self.rb = r_block(max((A.shape[0] for A in As), default=1))
        self.tab = torch.tensor(rows, dtype=torch.int64).to(dev, non_blocking=True)
        self.tile_layer = torch.tensor(tile_layer or [0], dtype=torch.int32).to(dev, non_blocking=True)
        self.flags = torch.tensor([int(w.shape[0] > 0 and w.shape[1] > 0) for w in weights],
                                  dtype=torch.int32).to(dev, non_blocking=True)
        self.scales = torch.tensor(scales, dtype=torch.float32).to(dev, non_blocking=True)
        self.t = torch.zeros(max(t_off, 1), dtype=torch.float32, device=dev)
        self.a = torch.zeros(max(a_off, 1), dtype=torch.float32, device=dev)
        self.part = torch.empty(max(p_off, 1), dtype=torch.float32, device=dev)
        self.ypart = torch.zeros(max(y_off, 1), dtype=torch.float32, device=dev)
        self.z = torch.zeros(max(z_off, 1), dtype=torch.float32, device=dev)
        self.wdt = ps.W_DTYPES[weights[0].dtype]

    def step(self, est, u0, v0, tol, first):
        c = self.cfg
        _lowrank_z_kernel[(self.L,)](self.tab, self.flags, self.scales, self.z, NF=_NF, R_BLOCK=self.rb,
                                     BLOCK_N=Z_BLOCK_N, num_warps=4)
        if self.ntiles:
            _lowrank_rows_kernel[(self.ntiles,)](self.tab, self.tile_layer, self.flags, self.z, self.t, self.part,
                                                 self.ypart, W_DTYPE=self.wdt, NF=_NF, BLOCK_M=c["BLOCK_M"],
                                                 BLOCK_N=c["BLOCK_N"], R_BLOCK=self.rb, num_warps=c["num_warps"],
                                                 num_stages=c["num_stages"])
        if self.max_n > 0:
            grid = (self.L, triton.cdiv(self.max_n, ps.REDUCE_COLS))
            ps._reduce_partials_kernel[grid](self.tab, self.flags, self.part, self.a, NF=_NF,
                                             ROWS_PER_PART=c["BLOCK_M"], BLOCK=ps.REDUCE_COLS,
                                             PARTS=ps.REDUCE_PARTS, num_warps=4)
            _lowrank_adjoint_kernel[grid](self.tab, self.flags, self.scales, self.ypart, self.a, NF=_NF,
                                          ROWS_PER_PART=c["BLOCK_M"], R_BLOCK=self.rb, BLOCK=ps.REDUCE_COLS,
                                          PARTS=ps.REDUCE_PARTS, num_warps=4)
        ps._finalize_kernel[(self.L,)](self.tab, self.flags, est, self.t, self.a, u0, v0, float(tol), NF=_NF,
                                       FIRST=first, BLOCK=ps.REDUCE_BLOCK, FMAX=ps.FLT_MAX, num_warps=4)


def lowrank_power_step_(weights: List[torch.Tensor], As: List[torch.Tensor], Bs: List[torch.Tensor],
                        scales: List[float], us: List[torch.Tensor], vs: List[torch.Tensor], n_iter: int,
                        tol: float, config: Optional[Dict[str, int]] = None) -> torch.Tensor:
    """``specreg_fast::lowrank_power_step_`` with the Triton kernels, for maps whose vectors are
    float32 (W float32/bfloat16/float16, factors of any of those dtypes): one launch sequence per
    W dtype per step. Arguments checked by the caller (the op's checks,
    ``ops.lowrank_step._check_step_args``); ``n_iter >= 1``. ``config`` (one of ``ps.CONFIGS``)
    overrides the tuned choice."""
    dev = weights[0].device
    out = torch.zeros(len(weights), dtype=torch.float32, device=dev)
    groups: Dict[torch.dtype, List[int]] = {}
    for l, W in enumerate(weights):
        groups.setdefault(W.dtype, []).append(l)
    for idx in groups.values():
        ws = [weights[i] for i in idx]
        gu = [us[i] for i in idx]
        gv = [vs[i] for i in idx]
        plan = _Plan(ws, [As[i] for i in idx], [Bs[i] for i in idx], [scales[i] for i in idx], gu, gv,
                     config or ps.pick_config(ws))
        u0 = torch.cat(gu + [plan.t.new_zeros(plan.t.numel() - sum(u.numel() for u in gu))])
        v0 = torch.cat(gv + [plan.a.new_zeros(plan.a.numel() - sum(v.numel() for v in gv))])
        est = torch.zeros(len(idx), dtype=torch.float32, device=dev)
        for it in range(n_iter):
            plan.step(est, u0, v0, tol, it == 0)
        out[idx] = est
    return out

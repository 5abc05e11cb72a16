"""Triton kernels of the dense ops: a grouped power step and the grouped bilinear form.

One launch covers the whole list of weights of one dtype. The host packs a table (int64,
one row of ``_NF`` fields per layer: pointers, shape, strides, offsets into the packed work
buffers) and a tile -> layer map; program ``pid`` handles one row block of ``BLOCK_M`` rows
of whichever layer owns it, so layers of very different sizes share one grid.

A step is three launches, none of which synchronizes with the host:

1. ``_fused_rows_kernel``: per row block B, ``t_B = W_B v`` (fp32 accumulation) and the
   partial ``W_B^T t_B``. W comes from DRAM once; the second touch of the row block
   (``BLOCK_M`` rows) is served from L1/L2. Partials go to a per-row-block buffer rather
   than atomics, so the sum below has a fixed order and the result is deterministic.
2. ``_reduce_partials_kernel``: ``a = W^T W v`` = the row-block partials summed in a fixed
   order (32 columns per program, so a tall layer still gets many programs).
3. ``_finalize_kernel``: one program per layer: |t|, |a|, then u = t/|t|, v = a/|a| and the
   estimate |a|/|t| (= u^T W v_new), or the op's conventions: zero W keeps the vectors with
   estimate 0; a non-finite |t| or |a| restores the vectors saved at the start of the call
   with estimate NaN; with tol > 0 a converged layer is switched off (device-side flag) so
   later steps skip it.

fp64 weights are not handled here (Triton fp64 throughput is not the point); the backend
layer sends them to the reference kernel.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["CONFIGS", "power_step_", "sigma", "pick_config", "W_DTYPES"]

# Table fields (int64 per layer).
_F_W, _F_M, _F_N, _F_SM, _F_SN, _F_U, _F_V, _F_TOFF, _F_AOFF, _F_POFF, _F_TILE0 = range(11)
_NF = 11

W_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# Autotune grid (BLOCK_M rows per program, BLOCK_N columns per chunk, warps, stages). Few,
# on purpose: every config is compiled ahead of time for sm_80 and sm_90 in CI. BLOCK_M 32-64
# keeps the partial buffer at 1/32-1/64 of W (fp32) while the row block re-read fits L1. Configs
# that spilled at sm_90 (BM64/BN64 on 4 warps, BM16 with wide BN) were dropped; the AOT test
# fails if a grouped-kernel config spills (table: bench/triton_resource_usage.txt).
CONFIGS: List[Dict[str, int]] = [
    dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=256, num_warps=8, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=64, num_warps=2, num_stages=2),
]
# Under TRITON_INTERPRET=1 (CPU) block sizes only cost time: use small ones.
INTERPRET_CONFIG = dict(BLOCK_M=8, BLOCK_N=16, num_warps=1, num_stages=1)
REDUCE_BLOCK = 256  # finalize: vector chunk
REDUCE_COLS = 32    # reduce_partials: columns per program
REDUCE_PARTS = 32   # reduce_partials: row-block partials per loop step
FLT_MAX = 3.4028234663852886e38


@triton.jit
def _fused_rows_kernel(tab_ptr, tile_layer_ptr, flags_ptr, t_ptr, part_ptr, W_DTYPE: tl.constexpr,
                       NF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # tab_ptr:        int64 [L, NF] layer table (w, m, n, stride_m, stride_n, u, v, t_off, a_off, p_off, tile0)
    # tile_layer_ptr: int32 [ntiles] layer of each program's row block
    # flags_ptr:      int32 [L] 1 while the layer still iterates
    # t_ptr:          fp32 [sum m] W v, packed by t_off
    # part_ptr:       fp32 [sum ntiles_l * n_l] per-row-block W_B^T t_B, packed by p_off
    pid = tl.program_id(0)
    layer = tl.load(tile_layer_ptr + pid)
    row = tab_ptr + layer * NF
    active = tl.load(flags_ptr + layer)
    if active != 0:
        w = tl.load(row + 0).to(tl.pointer_type(W_DTYPE))
        m = tl.load(row + 1)
        n = tl.load(row + 2)
        sm = tl.load(row + 3)
        sn = tl.load(row + 4)
        v = tl.load(row + 6).to(tl.pointer_type(tl.float32))
        t_off = tl.load(row + 7)
        p_off = tl.load(row + 9)
        rb = pid - tl.load(row + 10)
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < m
        cols0 = tl.arange(0, BLOCK_N)
        if n <= BLOCK_N:
            # Narrow layer: the row block is one tile, held in registers for both products.
            cmask = cols0 < n
            wt = tl.load(w + rows[:, None] * sm + cols0[None, :] * sn, mask=rmask[:, None] & cmask[None, :],
                         other=0.0).to(tl.float32)
            vv = tl.load(v + cols0, mask=cmask, other=0.0)
            t = tl.sum(wt * vv[None, :], axis=1)
            tl.store(t_ptr + t_off + rows, t, mask=rmask)
            tl.store(part_ptr + p_off + rb * n + cols0, tl.sum(wt * t[:, None], axis=0), mask=cmask)
        else:
            t = tl.zeros([BLOCK_M], dtype=tl.float32)
            for c0 in range(0, n, BLOCK_N):
                cols = c0 + cols0
                cmask = cols < n
                wt = tl.load(w + rows[:, None] * sm + cols[None, :] * sn, mask=rmask[:, None] & cmask[None, :],
                             other=0.0).to(tl.float32)
                vv = tl.load(v + cols, mask=cmask, other=0.0)
                t += tl.sum(wt * vv[None, :], axis=1)
            tl.store(t_ptr + t_off + rows, t, mask=rmask)
            # Second touch of the row block (BLOCK_M rows, just read): from L1/L2, not DRAM.
            for c0 in range(0, n, BLOCK_N):
                cols = c0 + cols0
                cmask = cols < n
                wt = tl.load(w + rows[:, None] * sm + cols[None, :] * sn, mask=rmask[:, None] & cmask[None, :],
                             other=0.0).to(tl.float32)
                a = tl.sum(wt * t[:, None], axis=0)
                tl.store(part_ptr + p_off + rb * n + cols, a, mask=cmask)


@triton.jit
def _reduce_partials_kernel(tab_ptr, flags_ptr, part_ptr, a_ptr, NF: tl.constexpr, ROWS_PER_PART: tl.constexpr,
                            BLOCK: tl.constexpr, PARTS: tl.constexpr):
    # a_j = sum over row blocks p of part[p, j]: a [PARTS, BLOCK] tile accumulated over the
    # row blocks, then summed over axis 0 (fixed order: deterministic). Many programs per
    # layer (BLOCK columns each) so that a tall layer's reduction is not a few long loops.
    layer = tl.program_id(0)
    cb = tl.program_id(1)
    row = tab_ptr + layer * NF
    active = tl.load(flags_ptr + layer)
    n = tl.load(row + 2)
    if (active != 0) & (cb * BLOCK < n):
        m = tl.load(row + 1)
        a_off = tl.load(row + 8)
        p_off = tl.load(row + 9)
        nparts = (m + ROWS_PER_PART - 1) // ROWS_PER_PART
        cols = cb * BLOCK + tl.arange(0, BLOCK)
        cmask = cols < n
        pr = tl.arange(0, PARTS)
        acc = tl.zeros([PARTS, BLOCK], dtype=tl.float32)
        for p0 in range(0, nparts, PARTS):
            pp = p0 + pr
            acc += tl.load(part_ptr + p_off + pp[:, None] * n + cols[None, :],
                           mask=(pp < nparts)[:, None] & cmask[None, :], other=0.0)
        tl.store(a_ptr + a_off + cols, tl.sum(acc, axis=0), mask=cmask)


@triton.jit
def _finalize_kernel(tab_ptr, flags_ptr, est_ptr, t_ptr, a_ptr, u0_ptr, v0_ptr, tol, NF: tl.constexpr,
                     FIRST: tl.constexpr, BLOCK: tl.constexpr, FMAX: tl.constexpr):
    layer = tl.program_id(0)
    row = tab_ptr + layer * NF
    active = tl.load(flags_ptr + layer)
    if active != 0:
        m = tl.load(row + 1)
        n = tl.load(row + 2)
        u = tl.load(row + 5).to(tl.pointer_type(tl.float32))
        v = tl.load(row + 6).to(tl.pointer_type(tl.float32))
        t_off = tl.load(row + 7)
        a_off = tl.load(row + 8)
        offs = tl.arange(0, BLOCK)
        tacc = tl.zeros([BLOCK], dtype=tl.float32)
        for i0 in range(0, m, BLOCK):
            x = tl.load(t_ptr + t_off + i0 + offs, mask=i0 + offs < m, other=0.0)
            tacc += x * x
        aacc = tl.zeros([BLOCK], dtype=tl.float32)
        for j0 in range(0, n, BLOCK):
            x = tl.load(a_ptr + a_off + j0 + offs, mask=j0 + offs < n, other=0.0)
            aacc += x * x
        tn = tl.sqrt(tl.sum(tacc, axis=0))
        an = tl.sqrt(tl.sum(aacc, axis=0))
        finite = (tn <= FMAX) & (an <= FMAX)  # False for inf and NaN
        if finite == 0:
            # Non-finite weight: the vectors go back to their values at the start of the call.
            for i0 in range(0, m, BLOCK):
                msk = i0 + offs < m
                tl.store(u + i0 + offs, tl.load(u0_ptr + t_off + i0 + offs, mask=msk), mask=msk)
            for j0 in range(0, n, BLOCK):
                msk = j0 + offs < n
                tl.store(v + j0 + offs, tl.load(v0_ptr + a_off + j0 + offs, mask=msk), mask=msk)
            tl.store(est_ptr + layer, float("nan"))
            tl.store(flags_ptr + layer, 0)
        elif (tn == 0.0) | (an == 0.0):
            # W v = 0: nothing to learn from this step; keep the vectors, estimate 0.
            tl.store(est_ptr + layer, 0.0)
            tl.store(flags_ptr + layer, 0)
        else:
            itn = 1.0 / tn
            ian = 1.0 / an
            for i0 in range(0, m, BLOCK):
                msk = i0 + offs < m
                tl.store(u + i0 + offs, tl.load(t_ptr + t_off + i0 + offs, mask=msk) * itn, mask=msk)
            for j0 in range(0, n, BLOCK):
                msk = j0 + offs < n
                tl.store(v + j0 + offs, tl.load(a_ptr + a_off + j0 + offs, mask=msk) * ian, mask=msk)
            new = an / tn
            prev = tl.load(est_ptr + layer)
            tl.store(est_ptr + layer, new)
            if not FIRST:
                if (tol > 0.0) & (tl.abs(new - prev) <= tol * new):
                    tl.store(flags_ptr + layer, 0)


@triton.jit
def _bilinear_rows_kernel(tab_ptr, tile_layer_ptr, part_ptr, W_DTYPE: tl.constexpr, NF: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    layer = tl.load(tile_layer_ptr + pid)
    row = tab_ptr + layer * NF
    w = tl.load(row + 0).to(tl.pointer_type(W_DTYPE))
    m = tl.load(row + 1)
    n = tl.load(row + 2)
    sm = tl.load(row + 3)
    sn = tl.load(row + 4)
    u = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    v = tl.load(row + 6).to(tl.pointer_type(tl.float32))
    rb = pid - tl.load(row + 10)
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < m
    cols0 = tl.arange(0, BLOCK_N)
    t = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, n, BLOCK_N):
        cols = c0 + cols0
        cmask = cols < n
        wt = tl.load(w + rows[:, None] * sm + cols[None, :] * sn, mask=rmask[:, None] & cmask[None, :],
                     other=0.0).to(tl.float32)
        vv = tl.load(v + cols, mask=cmask, other=0.0)
        t += tl.sum(wt * vv[None, :], axis=1)
    uu = tl.load(u + rows, mask=rmask, other=0.0)
    tl.store(part_ptr + pid, tl.sum(t * uu, axis=0))


@triton.jit
def _sum_tiles_kernel(tab_ptr, tile_count_ptr, part_ptr, out_ptr, NF: tl.constexpr):
    layer = tl.program_id(0)
    tile0 = tl.load(tab_ptr + layer * NF + 10)
    cnt = tl.load(tile_count_ptr + layer)
    s = 0.0
    for i in range(0, cnt):
        s += tl.load(part_ptr + tile0 + i)
    tl.store(out_ptr + layer, s)


# ----------------------------------------------------------------------------- host side
def _interpret() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TUNED: Dict[Tuple, Dict[str, int]] = {}


def pick_config(weights: Sequence[torch.Tensor]) -> Dict[str, int]:
    """The launch config for a list of weights: the interpreter's small one on CPU; on a GPU
    each config of CONFIGS is timed once per (dtype, shapes) key on the pure first phase
    (it writes only work buffers, so re-running it is harmless) and the fastest is kept."""
    if _interpret() or not weights[0].is_cuda:
        return INTERPRET_CONFIG
    key = (weights[0].dtype, tuple(tuple(w.shape) for w in weights), tuple(tuple(w.stride()) for w in weights))
    cfg = _TUNED.get(key)
    if cfg is None:
        cfg = _autotune(weights)
        _TUNED[key] = cfg
    return cfg


def _autotune(weights: Sequence[torch.Tensor]) -> Dict[str, int]:
    us = [torch.zeros(w.shape[0], device=w.device) for w in weights]
    vs = [torch.full((w.shape[1],), 1.0 / max(1, w.shape[1]) ** 0.5, device=w.device) for w in weights]
    best, best_t = CONFIGS[0], math.inf
    for cfg in CONFIGS:
        plan = _Plan(weights, us, vs, cfg)
        plan.phase1()  # compile + warm up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            plan.phase1()
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end)
        if ms < best_t:
            best, best_t = cfg, ms
    return best


# Device copies of the (immutable) table, tile map, tile counts and initial flags, keyed by
# the table's integers: the same pointers, shapes and strides give the same table, so a
# training loop uploads it once. Bounded; holds no reference to the tensors themselves.
_TABLES: "OrderedDict[tuple, tuple]" = OrderedDict()
_TABLES_MAX = 16


class _Plan:
    """Packed table, tile map and work buffers of one dtype group for one config."""

    def __init__(self, weights, us, vs, cfg):
        self.cfg = cfg
        dev = weights[0].device
        bm = cfg["BLOCK_M"]
        rows: List[int] = []
        tile_layer: List[int] = []
        tile_count: List[int] = []
        t_off = a_off = p_off = 0
        for l, (W, u, v) in enumerate(zip(weights, us, vs)):
            m, n = W.shape
            ntiles = -(-m // bm) if n > 0 else 0
            rows += [W.data_ptr(), m, n, W.stride(0), W.stride(1), u.data_ptr(), v.data_ptr(), t_off, a_off, p_off,
                     len(tile_layer)]
            tile_layer += [l] * ntiles
            tile_count.append(ntiles)
            t_off += m
            a_off += n
            p_off += ntiles * n
        self.L = len(weights)
        self.ntiles = len(tile_layer)
        self.max_n = max((w.shape[1] for w in weights), default=0)
        key = (str(dev), bm, tuple(rows))
        cached = _TABLES.get(key)
        if cached is None:
            flags0 = [int(w.shape[0] > 0 and w.shape[1] > 0) for w in weights]
            cached = (torch.tensor(rows, dtype=torch.int64).to(dev, non_blocking=True),
                      torch.tensor(tile_layer or [0], dtype=torch.int32).to(dev, non_blocking=True),
                      torch.tensor(tile_count, dtype=torch.int32).to(dev, non_blocking=True),
                      torch.tensor(flags0, dtype=torch.int32).to(dev, non_blocking=True))
            _TABLES[key] = cached
            if len(_TABLES) > _TABLES_MAX:
                _TABLES.popitem(last=False)
        else:
            _TABLES.move_to_end(key)
        self.tab, self.tile_layer, self.tile_count, flags0 = cached
        self.flags = flags0.clone()  # switched off per layer on device as layers stop
        self.t = torch.zeros(max(t_off, 1), dtype=torch.float32, device=dev)
        self.a = torch.zeros(max(a_off, 1), dtype=torch.float32, device=dev)
        self.part = torch.empty(max(p_off, 1), dtype=torch.float32, device=dev)
        self.wdt = W_DTYPES[weights[0].dtype]

    def phase1(self):
        if self.ntiles == 0:
            return
        c = self.cfg
        _fused_rows_kernel[(self.ntiles,)](self.tab, self.tile_layer, self.flags, self.t, self.part,
                                           W_DTYPE=self.wdt, NF=_NF, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"],
                                           num_warps=c["num_warps"], num_stages=c["num_stages"])

    def step(self, est, u0, v0, tol, first):
        self.phase1()
        if self.max_n > 0:
            _reduce_partials_kernel[(self.L, triton.cdiv(self.max_n, REDUCE_COLS))](
                self.tab, self.flags, self.part, self.a, NF=_NF, ROWS_PER_PART=self.cfg["BLOCK_M"],
                BLOCK=REDUCE_COLS, PARTS=REDUCE_PARTS, num_warps=4)
        _finalize_kernel[(self.L,)](self.tab, self.flags, est, self.t, self.a, u0, v0, float(tol), NF=_NF,
                                    FIRST=first, BLOCK=REDUCE_BLOCK, FMAX=FLT_MAX, num_warps=4)


def _check(weights, us, vs, op):
    if not (len(us) == len(weights) == len(vs)):
        raise ValueError(f"{op}: expected as many u and v vectors as weights, got {len(weights)} weights, "
                         f"{len(us)} u, {len(vs)} v")
    for l, (W, u, v) in enumerate(zip(weights, us, vs)):
        if W.dim() != 2:
            raise ValueError(f"{op}: weights[{l}] must be 2-D, got shape {tuple(W.shape)}")
        if W.dtype not in W_DTYPES:
            raise TypeError(f"{op}: weights[{l}] must be float32/bfloat16/float16 for the Triton kernel, got "
                            f"{W.dtype}")
        if u.shape != (W.shape[0],) or v.shape != (W.shape[1],):
            raise ValueError(f"{op}: us[{l}]/vs[{l}] must have shapes ({W.shape[0]},)/({W.shape[1]},), got "
                             f"{tuple(u.shape)}/{tuple(v.shape)}")
        if u.dtype != torch.float32 or v.dtype != torch.float32:
            raise ValueError(f"{op}: us[{l}]/vs[{l}] must be float32, got {u.dtype}/{v.dtype}")
        if not (u.is_contiguous() and v.is_contiguous()):
            raise ValueError(f"{op}: us[{l}]/vs[{l}] must be contiguous")
        if u.device != W.device or v.device != W.device:
            raise ValueError(f"{op}: us[{l}]/vs[{l}] must be on {W.device}")


def _groups(weights) -> Dict[torch.dtype, List[int]]:
    g: Dict[torch.dtype, List[int]] = {}
    for l, W in enumerate(weights):
        g.setdefault(W.dtype, []).append(l)
    return g


def power_step_(weights: List[torch.Tensor], us: List[torch.Tensor], vs: List[torch.Tensor], n_iter: int,
                tol: float, config: Optional[Dict[str, int]] = None) -> torch.Tensor:
    """``specreg_fast::power_step_`` with the Triton kernels (float32/bfloat16/float16
    weights): one grouped launch sequence per weight dtype present in the list. ``config``
    (one of CONFIGS) overrides the tuned choice (tests run every config)."""
    _check(weights, us, vs, "specreg_fast::power_step_")
    if n_iter < 0:
        raise ValueError(f"specreg_fast::power_step_: n_iter must be >= 0, got {n_iter}")
    if not tol >= 0:
        raise ValueError(f"specreg_fast::power_step_: tol must be >= 0, got {tol}")
    if not weights:
        return torch.zeros(0, dtype=torch.float32)
    if n_iter == 0:
        return sigma(weights, us, vs, config)
    dev = weights[0].device
    out = torch.zeros(len(weights), dtype=torch.float32, device=dev)
    for idx in _groups(weights).values():
        ws = [weights[i] for i in idx]
        gu = [us[i] for i in idx]
        gv = [vs[i] for i in idx]
        plan = _Plan(ws, gu, gv, config or pick_config(ws))
        # Start-of-call copies, packed like the t / a work buffers, for the roll-back.
        u0 = torch.cat(gu + [plan.t.new_zeros(plan.t.numel() - sum(u.numel() for u in gu))])
        v0 = torch.cat(gv + [plan.a.new_zeros(plan.a.numel() - sum(v.numel() for v in gv))])
        est = torch.zeros(len(idx), dtype=torch.float32, device=dev)
        for it in range(n_iter):
            plan.step(est, u0, v0, tol, it == 0)
        out[idx] = est
    return out


def sigma(weights: List[torch.Tensor], us: List[torch.Tensor], vs: List[torch.Tensor],
          config: Optional[Dict[str, int]] = None) -> torch.Tensor:
    """``specreg_fast::sigma`` (u^T W v per layer) with the Triton kernels, float32 out;
    deterministic (row-block partials summed in order)."""
    _check(weights, us, vs, "specreg_fast::sigma")
    if not weights:
        return torch.zeros(0, dtype=torch.float32)
    dev = weights[0].device
    out = torch.zeros(len(weights), dtype=torch.float32, device=dev)
    for idx in _groups(weights).values():
        ws = [weights[i] for i in idx]
        cfg = config or pick_config(ws)
        plan = _Plan(ws, [us[i] for i in idx], [vs[i] for i in idx], cfg)
        res = torch.zeros(len(idx), dtype=torch.float32, device=dev)
        if plan.ntiles:
            part = torch.empty(plan.ntiles, dtype=torch.float32, device=dev)
            _bilinear_rows_kernel[(plan.ntiles,)](plan.tab, plan.tile_layer, part, W_DTYPE=plan.wdt, NF=_NF,
                                                  BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                                                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
            _sum_tiles_kernel[(len(idx),)](plan.tab, plan.tile_count, part, res, NF=_NF, num_warps=1)
        out[idx] = res
    return out

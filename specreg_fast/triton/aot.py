"""Ahead-of-time compilation of every Triton kernel (each launch config) to cubin, no GPU needed.

``compile_all(ccs)`` runs ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``
for each kernel variant and reads the resource usage back with ``ptxas -v`` on the
generated PTX (registers, spill stores/loads, stack) plus Triton's own shared-memory figure
(``metadata.shared``). ``CompiledKernel.n_regs``/``n_spills`` are only filled in when the
kernel is loaded on a GPU, hence ptxas.

Must run in a process without ``TRITON_INTERPRET=1`` (the interpreter replaces what
``@triton.jit`` returns).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from . import batched_power as bp
from . import lowrank_step as lr
from . import power_step as ps

__all__ = ["KernelVariant", "variants", "compile_variant", "compile_all", "ptxas_path", "format_table"]


@dataclass
class KernelVariant:
    label: str
    fn: object
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    num_warps: int
    num_stages: int = 2


def variants() -> Iterator[KernelVariant]:
    """Every kernel in the shapes it is launched with: each CONFIG of the grouped kernels
    for each weight dtype, and the batched kernel in its resident and chunked forms (real
    and complex) for the ResNet-18 FFT block shapes."""
    nf = ps._NF
    for wname, wdt in (("fp32", tl.float32), ("bf16", tl.bfloat16), ("fp16", tl.float16)):
        for c in ps.CONFIGS:
            tag = f"BM{c['BLOCK_M']}_BN{c['BLOCK_N']}_w{c['num_warps']}_s{c['num_stages']}"
            yield KernelVariant(
                f"fused_rows[{wname},{tag}]", ps._fused_rows_kernel,
                {"tab_ptr": "*i64", "tile_layer_ptr": "*i32", "flags_ptr": "*i32", "t_ptr": "*fp32",
                 "part_ptr": "*fp32", "W_DTYPE": "constexpr", "NF": "constexpr", "BLOCK_M": "constexpr",
                 "BLOCK_N": "constexpr"},
                {"W_DTYPE": wdt, "NF": nf, "BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]},
                c["num_warps"], c["num_stages"])
            yield KernelVariant(
                f"bilinear_rows[{wname},{tag}]", ps._bilinear_rows_kernel,
                {"tab_ptr": "*i64", "tile_layer_ptr": "*i32", "part_ptr": "*fp32", "W_DTYPE": "constexpr",
                 "NF": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"},
                {"W_DTYPE": wdt, "NF": nf, "BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]},
                c["num_warps"], c["num_stages"])
    for bm in sorted({c["BLOCK_M"] for c in ps.CONFIGS}):
        yield KernelVariant(
            f"reduce_partials[rows_per_part={bm}]", ps._reduce_partials_kernel,
            {"tab_ptr": "*i64", "flags_ptr": "*i32", "part_ptr": "*fp32", "a_ptr": "*fp32", "NF": "constexpr",
             "ROWS_PER_PART": "constexpr", "BLOCK": "constexpr", "PARTS": "constexpr"},
            {"NF": nf, "ROWS_PER_PART": bm, "BLOCK": ps.REDUCE_COLS, "PARTS": ps.REDUCE_PARTS}, 4)
    for first in (True, False):
        yield KernelVariant(
            f"finalize[first={first}]", ps._finalize_kernel,
            {"tab_ptr": "*i64", "flags_ptr": "*i32", "est_ptr": "*fp32", "t_ptr": "*fp32", "a_ptr": "*fp32",
             "u0_ptr": "*fp32", "v0_ptr": "*fp32", "tol": "fp32", "NF": "constexpr", "FIRST": "constexpr",
             "BLOCK": "constexpr", "FMAX": "constexpr"},
            {"NF": nf, "FIRST": first, "BLOCK": ps.REDUCE_BLOCK, "FMAX": ps.FLT_MAX}, 4)
    yield from lowrank_variants()
    yield KernelVariant(
        "sum_tiles", ps._sum_tiles_kernel,
        {"tab_ptr": "*i64", "tile_count_ptr": "*i32", "part_ptr": "*fp32", "out_ptr": "*fp32", "NF": "constexpr"},
        {"NF": nf}, 1)
    # Batched blocks: ResNet-18 (CIFAR, 3x3 convs) per-frequency blocks c_out x c_in*stride^2.
    seen = set()
    for m, n in bench_batched_shapes():
        for cplx in (False, True):
            prm = launch_params_key(m, n, cplx)
            if prm in seen:
                continue
            seen.add(prm)
            p = bp.launch_params(m, n, cplx)
            nw = p.pop("num_warps")
            form = "resident" if p["RESIDENT"] else "chunked"
            yield KernelVariant(
                f"batched_power[{'c64' if cplx else 'f32'},{form},M{p['M_PAD']}xN{p['N_PAD']},BM{p['BLOCK_M']}]",
                bp._batched_power_kernel,
                {"p_ptr": "*fp32", "u_ptr": "*fp32", "v_ptr": "*fp32", "t_ptr": "*fp32", "sigma_ptr": "*fp32",
                 "m": "i32", "n": "i32", "n_iter": "i32", "s_pb": "i64", "s_pm": "i64", "s_pn": "i64",
                 "COMPLEX": "constexpr", "RESIDENT": "constexpr", "M_PAD": "constexpr", "N_PAD": "constexpr",
                 "BLOCK_M": "constexpr"}, p, nw)


# The rank tiles the LoRA kernels are compiled for here (``lr.r_block``: ranks 9-16 and 33-64).
LOWRANK_R_BLOCKS = (16, 64)


def lowrank_variants() -> Iterator[KernelVariant]:
    """The LoRA kernels (:mod:`specreg_fast.triton.lowrank_step`): the row kernel for each weight
    dtype and CONFIG, the z and adjoint kernels, each for the rank tiles of LOWRANK_R_BLOCKS (the
    dense reduce and finalize kernels they also launch are compiled above with the dense table's
    NF; the LoRA table's NF only moves a constant)."""
    nf = lr._NF
    for rb in LOWRANK_R_BLOCKS:
        for wname, wdt in (("fp32", tl.float32), ("bf16", tl.bfloat16), ("fp16", tl.float16)):
            for c in ps.CONFIGS:
                tag = f"BM{c['BLOCK_M']}_BN{c['BLOCK_N']}_w{c['num_warps']}_s{c['num_stages']}"
                yield KernelVariant(
                    f"lowrank_rows[{wname},{tag},R{rb}]", lr._lowrank_rows_kernel,
                    {"tab_ptr": "*i64", "tile_layer_ptr": "*i32", "flags_ptr": "*i32", "z_ptr": "*fp32",
                     "t_ptr": "*fp32", "part_ptr": "*fp32", "ypart_ptr": "*fp32", "W_DTYPE": "constexpr",
                     "NF": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "R_BLOCK": "constexpr"},
                    {"W_DTYPE": wdt, "NF": nf, "BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"], "R_BLOCK": rb},
                    c["num_warps"], c["num_stages"])
        yield KernelVariant(
            f"lowrank_z[BN{lr.Z_BLOCK_N},R{rb}]", lr._lowrank_z_kernel,
            {"tab_ptr": "*i64", "flags_ptr": "*i32", "scale_ptr": "*fp32", "z_ptr": "*fp32", "NF": "constexpr",
             "R_BLOCK": "constexpr", "BLOCK_N": "constexpr"},
            {"NF": nf, "R_BLOCK": rb, "BLOCK_N": lr.Z_BLOCK_N}, 4)
        for bm in sorted({c["BLOCK_M"] for c in ps.CONFIGS}):
            yield KernelVariant(
                f"lowrank_adjoint[rows_per_part={bm},R{rb}]", lr._lowrank_adjoint_kernel,
                {"tab_ptr": "*i64", "flags_ptr": "*i32", "scale_ptr": "*fp32", "ypart_ptr": "*fp32", "a_ptr": "*fp32",
                 "NF": "constexpr", "ROWS_PER_PART": "constexpr", "R_BLOCK": "constexpr", "BLOCK": "constexpr",
                 "PARTS": "constexpr"},
                {"NF": nf, "ROWS_PER_PART": bm, "R_BLOCK": rb, "BLOCK": ps.REDUCE_COLS, "PARTS": ps.REDUCE_PARTS}, 4)


def bench_batched_shapes() -> List[tuple]:
    """(m, n) = (c_out, c_in * stride^2) of the ResNet-18 3x3 convs (and 1x1 shortcuts)."""
    return [(64, 3), (64, 64), (128, 256), (128, 128), (128, 64 * 4), (256, 512), (256, 256), (512, 1024),
            (512, 512)]


def launch_params_key(m, n, cplx):
    p = bp.launch_params(m, n, cplx)
    return tuple(sorted(p.items()))


def ptxas_path() -> str:
    cands = [os.environ.get("TRITON_PTXAS_PATH", ""),
             os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"),
             shutil.which("ptxas") or "", "/usr/local/cuda/bin/ptxas"]
    for c in cands:
        if c and os.path.exists(c):
            return c
    raise FileNotFoundError("ptxas not found (looked in TRITON_PTXAS_PATH, triton's bundled bin, PATH, "
                            "/usr/local/cuda/bin)")


_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_STACK = re.compile(r"(\d+) bytes stack frame")


def compile_variant(kv: KernelVariant, cc: int) -> Dict[str, object]:
    src = triton.compiler.ASTSource(fn=kv.fn, signature=kv.signature, constexprs=kv.constexprs)
    ck = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                        options={"num_warps": kv.num_warps, "num_stages": kv.num_stages})
    cubin = ck.asm["cubin"]
    ptx = ck.asm["ptx"]
    arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, "k.ptx")
        with open(f, "w") as fh:
            fh.write(ptx)
        r = subprocess.run([ptxas_path(), f"-arch={arch}", "-v", f, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True, check=True)
    log = r.stdout + r.stderr
    regs = int(_RE_REGS.search(log).group(1))
    sp = _RE_SPILL.search(log)
    st = _RE_STACK.search(log)
    return dict(kernel=kv.label, cc=cc, arch=arch, num_warps=kv.num_warps, num_stages=kv.num_stages,
                registers=regs, spill_stores=int(sp.group(1)) if sp else 0,
                spill_loads=int(sp.group(2)) if sp else 0, stack=int(st.group(1)) if st else 0,
                shared=int(ck.metadata.shared), cubin_bytes=len(cubin))


def compile_all(ccs: Sequence[int] = (80, 90)) -> List[Dict[str, object]]:
    return [compile_variant(kv, cc) for cc in ccs for kv in variants()]


def format_table(rows: List[Dict[str, object]]) -> str:
    head = f"{'kernel':<58} {'cc':>3} {'warps':>5} {'regs':>5} {'spill_st':>8} {'spill_ld':>8} {'stack':>6} {'smem':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['kernel']:<58} {r['cc']:>3} {r['num_warps']:>5} {r['registers']:>5} "
                     f"{r['spill_stores']:>8} {r['spill_loads']:>8} {r['stack']:>6} {r['shared']:>7}")
    return "\n".join(lines)

"""Every Triton kernel, in every launch config, compiled ahead of time to cubin for sm_80 and
sm_90 (no GPU needed): a compile error fails the test; registers, spills and shared memory
are printed per config (``pytest -s``; ``bench/triton_resource_usage.py`` saves the table).

Runs in the normal (non-interpreter) process; skips under ``TRITON_INTERPRET=1``, where
``@triton.jit`` returns interpreter objects that cannot be compiled.
"""
import os

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="AOT compilation needs a process without TRITON_INTERPRET")

triton = pytest.importorskip("triton")


def _variants():
    from specreg_fast.triton import aot

    return list(aot.variants())


@pytest.mark.parametrize("cc", [80, 90])
def test_every_triton_kernel_compiles_to_cubin(cc):
    from specreg_fast.triton import aot, batched_power, power_step

    rows = []
    for kv in _variants():
        r = aot.compile_variant(kv, cc)  # raises on any compile / ptxas error
        assert r["cubin_bytes"] > 0 and r["arch"].startswith(f"sm_{cc}")
        assert 0 < r["registers"] <= 255
        rows.append(r)
    print()
    print(aot.format_table(rows))
    labels = {r["kernel"] for r in rows}
    # Each autotune config of the grouped kernels, for each weight dtype, is in the list.
    for c in power_step.CONFIGS:
        tag = f"BM{c['BLOCK_M']}_BN{c['BLOCK_N']}_w{c['num_warps']}_s{c['num_stages']}"
        for w in ("fp32", "bf16", "fp16"):
            assert f"fused_rows[{w},{tag}]" in labels and f"bilinear_rows[{w},{tag}]" in labels
    assert any(l.startswith("batched_power[c64,resident") for l in labels)
    assert any(l.startswith("batched_power[c64,chunked") for l in labels)
    # The LoRA kernels: the row kernel of each config, dtype and rank tile, the z and adjoint kernels.
    from specreg_fast.triton import aot as _aot
    for rb in _aot.LOWRANK_R_BLOCKS:
        for c in power_step.CONFIGS:
            tag = f"BM{c['BLOCK_M']}_BN{c['BLOCK_N']}_w{c['num_warps']}_s{c['num_stages']}"
            assert all(f"lowrank_rows[{w},{tag},R{rb}]" in labels for w in ("fp32", "bf16", "fp16"))
        assert any(l.startswith("lowrank_z[") and l.endswith(f"R{rb}]") for l in labels)
        assert any(l.startswith("lowrank_adjoint[") and l.endswith(f"R{rb}]") for l in labels)
    # The grouped dense kernels (and the LoRA kernels) must not spill in any config.
    spilled = [r["kernel"] for r in rows if r["kernel"].startswith(("fused_rows", "bilinear_rows", "lowrank_"))
               and (r["spill_stores"] or r["spill_loads"])]
    assert not spilled, f"register spills at sm_{cc}: {spilled}"
    assert batched_power.RESIDENT_MAX > 0

"""Memory-roofline ESTIMATES for the GPU kernels (no GPU involved; nothing here is measured).

For each GPU kernel and the benchmark shapes, prints the bytes the kernel must move through
DRAM and the resulting lower-bound time at peak bandwidth on an H100 SXM (3.35 TB/s) and an
A100 40GB (2.0 TB/s, the brief's figure). The kernels are bandwidth-bound (about 2 flops per
weight byte for fp32, 4 for bf16), so these are the floors a real run can approach, not
predictions of it.

Columns:
  W-once   : bytes of the weights alone (the floor of any single-pass power step)
  kernel   : (H100 grid) W once + the vectors + what our kernels add (per-row-block partials of W^T t,
             written and read back; t, a, u, v; the table), per power step
  H100/A100: kernel bytes / peak bandwidth, in microseconds (ESTIMATE)

Batched (Fourier-domain conv norm, ResNet-18 on 32x32 inputs, circular padding): one complex
c_out x (c_in*s^2) block per frequency of the (H/s) x (W/s) grid (all frequencies; a real
input's conjugate symmetry would halve them). Resident blocks read P once per call; chunked
blocks stream P once per iteration (+1 for the final sigma), which is what "streamed" counts.

    python -m specreg_fast.benchmarks.roofline [--json out.json] [--batched-iters 10]
(`specreg-fast bench` prints it on a machine without a GPU.)
"""
from __future__ import annotations

import argparse
import json

BW = {"H100": 3.35e12, "A100": 2.0e12}
#: Nominal peaks of other GPUs (the bench's GPU rows give their share of it), not used in the estimates.
PEAK_BW = {**BW, "H200": 4.8e12}
ESIZE = {"fp32": 4, "bf16": 2, "fp16": 2}
SMS = {"H100": 132, "A100": 108}


def cuda_rows(layers, sms, esize):
    # pick_rows_per_tile in csrc/cuda/power_step_cuda.cu: 32, halved while the list has fewer
    # than 2 tiles per SM and the partials stay <= 12.5% of W's bytes.
    rows = 32
    while rows > 8 and sum(-(-m // rows) for m, n in layers if n) < 2 * sms and (rows // 2) * esize >= 64:
        rows //= 2
    return rows


TRITON_BLOCK_M = 32     # smallest BLOCK_M of specreg_fast/triton/power_step.CONFIGS (largest partials)

DENSE_CASES = [
    ("1000x784", [(1000, 784)]),
    ("1024x1024", [(1024, 1024)]),
    ("4096x4096", [(4096, 4096)]),
    ("8192x2048", [(8192, 2048)]),
    ("MLP 784-1024-1024-1024", [(1024, 784), (1024, 1024), (1024, 1024)]),
]

# (name, c_in, c_out, stride, input H=W) of the CIFAR ResNet-18 3x3 convs and 1x1 shortcuts.
RESNET18 = [("conv1", 3, 64, 1, 32), ("layer1 3x3", 64, 64, 1, 32), ("layer2.0 3x3 s2", 64, 128, 2, 32),
            ("layer2.0 shortcut s2", 64, 128, 2, 32), ("layer2 3x3", 128, 128, 1, 16),
            ("layer3.0 3x3 s2", 128, 256, 2, 16), ("layer3 3x3", 256, 256, 1, 8), ("layer4.0 3x3 s2", 256, 512, 2, 8),
            ("layer4 3x3", 512, 512, 1, 4)]


def dense_step_bytes(layers, esize, rows_per_part):
    w = sum(m * n * esize for m, n in layers)
    extra = 0
    for m, n in layers:
        parts = -(-m // rows_per_part)
        extra += n * 4                 # v (read; L2-resident across row blocks)
        extra += m * 4                 # t written
        extra += 2 * parts * n * 4     # partials written, then read by the reduction
        extra += n * 4                 # a written
        extra += 2 * (m + n) * 4       # finalize: t, a read
        extra += 2 * (m + n) * 4       # u, v written (and the start-of-call copies, first step)
        extra += 88                    # table row
    return w, w + extra


def sigma_bytes(layers, esize):
    return sum(m * n * esize + (m + n) * 4 for m, n in layers)


def batched_bytes(B, m, n, n_iter):
    from specreg_fast.triton.batched_power import launch_params

    p = launch_params(m, n, True)
    once = B * m * n * 8 + B * (2 * m + 2 * n) * 8 + B * 4
    streamed = once if p["RESIDENT"] else once + B * m * n * 8 * n_iter + B * m * 8 * 2 * n_iter
    return p["RESIDENT"], once, streamed


def us(b, dev):
    return b / BW[dev] * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--batched-iters", type=int, default=10)
    args = ap.parse_args(argv)
    out = {"note": "ESTIMATE: bytes / peak DRAM bandwidth; not a measurement", "bandwidth_Bps": BW,
           "dense": [], "batched": []}
    print("ESTIMATE (not measured): memory-roofline lower bounds, peak DRAM bandwidth H100 3.35 TB/s, A100 2.0 TB/s\n")
    print("Dense power step (one step, one read of W): grouped fused_rows + reduce + finalize")
    hdr = (f"{'kernel':<16} {'shapes':<24} {'dtype':<5} {'W-once MB':>9} {'kernel MB':>9} {'H100 us':>8} "
           f"{'A100 us':>8}  (ESTIMATE)")
    print(hdr)
    print("-" * len(hdr))
    for kernel in ("cuda power_step", "triton power_step"):
        for name, layers in DENSE_CASES:
            for dt in ("fp32", "bf16"):
                t = {}
                for dev in BW:
                    rows = cuda_rows(layers, SMS[dev], ESIZE[dt]) if kernel.startswith("cuda") else TRITON_BLOCK_M
                    w, t[dev] = dense_step_bytes(layers, ESIZE[dt], rows)
                print(f"{kernel:<16} {name:<24} {dt:<5} {w / 1e6:>9.2f} {t['H100'] / 1e6:>9.2f} "
                      f"{us(t['H100'], 'H100'):>8.1f} {us(t['A100'], 'A100'):>8.1f}")
                out["dense"].append(dict(kernel=kernel, shapes=name, layers=layers, dtype=dt, w_bytes=w,
                                         kernel_bytes_h100=t["H100"], kernel_bytes_a100=t["A100"],
                                         h100_us=us(t["H100"], "H100"), a100_us=us(t["A100"], "A100")))
    print()
    print("sigma (u^T W v; one read of W): cuda and triton bilinear_rows + sum_tiles")
    for name, layers in DENSE_CASES:
        for dt in ("fp32", "bf16"):
            b = sigma_bytes(layers, ESIZE[dt])
            print(f"{'sigma':<16} {name:<24} {dt:<5} {b / 1e6:>9.2f} {b / 1e6:>9.2f} {us(b, 'H100'):>8.1f} "
                  f"{us(b, 'A100'):>8.1f}")
            out["dense"].append(dict(kernel="sigma", shapes=name, layers=layers, dtype=dt, w_bytes=b, kernel_bytes=b,
                                     h100_us=us(b, "H100"), a100_us=us(b, "A100")))
    print()
    it = args.batched_iters
    print(f"Triton batched_power (complex64 blocks, {it} iterations in one launch), ResNet-18 CIFAR, circular")
    hdr = (f"{'layer':<22} {'B':>5} {'block':>10} {'form':<8} {'P-once MB':>9} {'streamed MB':>11} "
           f"{'H100 us':>8} {'A100 us':>8}  (ESTIMATE, floor=P once .. streamed)")
    print(hdr)
    print("-" * len(hdr))
    tot_once = tot_str = 0
    for name, cin, cout, s, hw in RESNET18:
        B = (hw // s) ** 2
        m, n = cout, cin * s * s
        res, once, streamed = batched_bytes(B, m, n, it)
        tot_once += once
        tot_str += streamed
        print(f"{name:<22} {B:>5} {f'{m}x{n}':>10} {'resident' if res else 'chunked':<8} {once / 1e6:>9.2f} "
              f"{streamed / 1e6:>11.2f} {us(once, 'H100'):>4.1f}-{us(streamed, 'H100'):<5.1f} "
              f"{us(once, 'A100'):>4.1f}-{us(streamed, 'A100'):<5.1f}")
        out["batched"].append(dict(layer=name, B=B, m=m, n=n, resident=res, n_iter=it, once_bytes=once,
                                   streamed_bytes=streamed, h100_us=[us(once, "H100"), us(streamed, "H100")],
                                   a100_us=[us(once, "A100"), us(streamed, "A100")]))
    print(f"{'total (one per layer)':<22} {'':>5} {'':>10} {'':<8} {tot_once / 1e6:>9.2f} {tot_str / 1e6:>11.2f} "
          f"{us(tot_once, 'H100'):>4.1f}-{us(tot_str, 'H100'):<5.1f} {us(tot_once, 'A100'):>4.1f}-{us(tot_str, 'A100'):<5.1f}")
    print("Note: one program per block, so B below the SM count (132 on H100, 108 on A100: layer3/4) cannot\n"
          "reach peak bandwidth; those rows are further from achievable than the others.")
    print("\nAll times above are ESTIMATES from byte counts; no GPU was used.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()

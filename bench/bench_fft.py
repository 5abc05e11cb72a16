"""Method A (the paper's circular-conv norm) on the ResNet-18/CIFAR conv shapes: our
matrix-free batched per-frequency power step against the authors' way in plain PyTorch.

Rows (all 11 layers per call, circular padding, float32, one step per call as in training):
  * ours: ``specreg_fast::circular_power_step_`` (two convs + FFTs of input/output-sized
    tensors per layer, no FFT of the kernel);
  * operator step: ``conv_power_step_`` on the same circular operators (method B's step, the
    yardstick: target ours <= 2x of it);
  * authors: FFT of the kernel zero-padded to the input size (polyphase split for strides)
    into per-frequency blocks P(w), then one batched complex power step with persistent
    per-frequency vectors (their ``src/model/regularizer/conv.py`` recipe in plain PyTorch);
  * authors, taps-DFT blocks: the same blocks from a direct DFT over the k x k taps
    (``reference.circular_transfer_blocks``) + the same step;
  * ours, explicit blocks: :func:`fft.circular_blocks` (a GEMM over the taps, half spectrum)
    + ``batched_power_step_`` (OpenMP C++);
  * exact: ``eigvalsh`` of every block's Gram matrix (the smaller side).
Accuracy: sigma after 30 steps of ours and of the authors' block iteration from the same
start, relative to the exact per-block value.

    python bench/bench_fft.py [--reps 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import interleaved, machine  # noqa: E402

from specreg_fast import conv, fft, ops  # noqa: E402
from specreg_fast import reference as ref  # noqa: E402
from specreg_fast.reference import ConvSpec  # noqa: E402

RESNET18_CIFAR = [
    (3, 64, 3, 1, 1, 32), (64, 64, 3, 1, 1, 32), (64, 128, 3, 2, 1, 32), (128, 128, 3, 1, 1, 16),
    (128, 256, 3, 2, 1, 16), (256, 256, 3, 1, 1, 8), (256, 512, 3, 2, 1, 8), (512, 512, 3, 1, 1, 4),
    (64, 128, 1, 2, 0, 32), (128, 256, 1, 2, 0, 16), (256, 512, 1, 2, 0, 8),
]


def make_specs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    specs = []
    for cin, cout, k, s, p, n in RESNET18_CIFAR:
        w = torch.randn(cout, cin, k, k, generator=g, dtype=torch.float64) * (2.0 / (cin * k * k)) ** 0.5
        specs.append(ConvSpec(weight=w.to(dtype), input_shape=(cin, n, n), stride=(s, s), padding=(p, p),
                              dilation=(1, 1), padding_mode="circular"))
    return specs


def authors_blocks_fft(W: torch.Tensor, n: int, s: int) -> torch.Tensor:
    """(freqs, C_out, C_in * s^2) blocks: the kernel zero-padded to n x n, split into its s^2
    polyphase pieces, 2-D FFT'd (the authors' construction)."""
    cout, cin, k, _ = W.shape
    Kp = W.new_zeros(cout, cin, n, n)
    Kp[:, :, :k, :k] = W
    m = n // s
    Kp = Kp.reshape(cout, cin, m, s, m, s).permute(0, 1, 3, 5, 2, 4)  # (cout, cin, s, s, m, m)
    P = torch.fft.fft2(Kp)  # over the m x m grid
    return P.reshape(cout, cin * s * s, m * m).permute(2, 0, 1).contiguous()


def authors_blocks_taps(W: torch.Tensor, n: int, s: int) -> torch.Tensor:
    P = ref.circular_transfer_blocks(W, (n, n), s, 1, 0, 1)
    return P.reshape(-1, P.shape[-2], P.shape[-1])


def block_power_step(P: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One batched complex power step in place on the per-frequency vectors ``v`` (freqs, n);
    returns sigma = max_w |P(w) v(w)|."""
    u = torch.linalg.matmul(P, v.unsqueeze(-1)).squeeze(-1)
    sig = torch.linalg.vector_norm(u, dim=-1)
    a = torch.linalg.matmul(P.conj().transpose(-2, -1), u.unsqueeze(-1)).squeeze(-1)
    v.copy_(a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp_min(1e-30))
    return sig.max()


def block_exact(P: torch.Tensor) -> torch.Tensor:
    G = P @ P.conj().transpose(-2, -1) if P.shape[-2] <= P.shape[-1] else P.conj().transpose(-2, -1) @ P
    return torch.linalg.eigvalsh(G)[..., -1].clamp_min(0).sqrt().max()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30, help="steps for the accuracy comparison")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    specs = make_specs()
    ws = [s.weight for s in specs]
    info = machine()
    print(f"method A (circular conv norm), ResNet-18/CIFAR convs (11 layers), float32, "
          f"{info['threads']} threads, torch {info['torch']}")

    # ---- state for each contender
    st = fft.init_circular_state(specs, generator=torch.Generator().manual_seed(1))
    params = sum((fft.circular_params(s) for s in specs), [])
    circ_specs = [ConvSpec(**{**s.__dict__, "padding": tuple((k - 1) // 2 for k in s.weight.shape[2:])})
                  for s in specs]
    cst = conv.init_conv_state(circ_specs, generator=torch.Generator().manual_seed(1))
    cparams, cmodes = ops.pack_conv_params(circ_specs)
    vs = []
    for s in specs:
        n, st_ = s.input_shape[1], s.stride[0]
        nb = (n // st_) ** 2
        vs.append(torch.randn(nb, s.input_shape[0] * st_ * st_, dtype=torch.complex64,
                              generator=torch.Generator().manual_seed(2)))

    def ours():
        return ops.circular_power_step_(ws, st.xs, params, 1)

    def operator_step():
        return ops.conv_power_step_(ws, cst.xs, cst.ys, cparams, cmodes, 1, 0.0)

    def authors_fft():
        with torch.no_grad():
            return [block_power_step(authors_blocks_fft(s.weight, s.input_shape[1], s.stride[0]), v)
                    for s, v in zip(specs, vs)]

    def authors_taps():
        with torch.no_grad():
            return [block_power_step(authors_blocks_taps(s.weight, s.input_shape[1], s.stride[0]), v)
                    for s, v in zip(specs, vs)]

    bst = fft.init_circular_block_state(specs, generator=torch.Generator().manual_seed(2))

    def ours_blocks():
        with torch.no_grad():
            return [ops.batched_power_step_(fft.circular_blocks(s.weight, s.input_shape[1:], s.stride), u, v, 1)
                    for s, u, v in zip(specs, bst.us, bst.vs)]

    def exact_eig():
        with torch.no_grad():
            return [block_exact(authors_blocks_fft(s.weight, s.input_shape[1], s.stride[0])) for s in specs]

    fast = interleaved({"ours": ours, "operator": operator_step}, repeats=max(args.reps, 9), warmup=2)
    slow = interleaved({"ours": ours, "ours_blocks": ours_blocks, "authors_fft": authors_fft,
                        "authors_taps": authors_taps, "exact_eigvalsh": exact_eig}, repeats=args.reps, warmup=1, min_time=0.0)
    rows = [
        ("ours: matrix-free step", fast["ours"]),
        ("operator step (method B, circular)", fast["operator"]),
        ("ours: explicit blocks (taps GEMM + C++ step)", slow["ours_blocks"]),
        ("authors: FFT of padded kernel + block step", slow["authors_fft"]),
        ("authors: taps-DFT blocks + block step", slow["authors_taps"]),
        ("exact: eigvalsh per block", slow["exact_eigvalsh"]),
    ]
    t_ours = fast["ours"]["median"]
    print(f"\n{'per step, all 11 layers':<44}{'median':>11}{'min-max':>22}{'vs ours':>10}")
    for name, t in rows:
        print(f"{name:<44}{t['median'] * 1e3:>9.2f}ms{t['min'] * 1e3:>10.2f}-{t['max'] * 1e3:<9.2f}ms"
              f"{t['median'] / t_ours:>9.1f}x")
    ratio_op = t_ours / fast["operator"]["median"]
    ratio_auth = slow["authors_fft"]["median"] / slow["ours"]["median"]
    print(f"\nours / operator step = {ratio_op:.2f} (target <= 2); authors (FFT) / ours = {ratio_auth:.0f}x "
          f"(target >= 80x; ours timed in the same interleaved run: {slow['ours']['median'] * 1e3:.2f} ms)")

    # ---- accuracy at equal steps, same start, vs the exact per-block value (float64)
    acc = []
    print(f"\n{'layer':<28}{'exact':>10}{'ours':>12}{'authors':>12}   (sigma after {args.steps} steps, rel. error)")
    for s in specs:
        s64 = ConvSpec(**{**s.__dict__, "weight": s.weight.double()})
        P = authors_blocks_fft(s64.weight, s.input_shape[1], s.stride[0])
        exact = block_exact(P).item()
        x0 = torch.randn(s.input_shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        e_ours = fft.circular_conv_norms([s64], fft.CircularState([x0.clone()]), n_iter=args.steps).item()
        # the authors' iteration from the same per-frequency start vectors
        v = torch.fft.fftn(ops.polyphase_split(x0, list(s.stride)), dim=(1, 2), norm="ortho")
        v = v.reshape(v.shape[0], -1).t().contiguous()
        v = v / v.norm(dim=1, keepdim=True)
        Pp = ref.circular_transfer_blocks(s64.weight, s.input_shape[1:], s.stride, 1, (s.weight.shape[2] - 1) // 2)
        Pp = Pp.reshape(-1, Pp.shape[-2], Pp.shape[-1])
        for _ in range(args.steps):
            e_auth = block_power_step(Pp, v).item()
        cin, cout, k, st_, n = s.input_shape[0], s.weight.shape[0], s.weight.shape[2], s.stride[0], s.input_shape[1]
        name = f"{cin}->{cout} k{k} s{st_} @{n}"
        acc.append(dict(layer=name, exact=exact, ours=e_ours, authors=e_auth))
        print(f"{name:<28}{exact:>10.4f}{abs(e_ours - exact) / exact:>12.1e}{abs(e_auth - exact) / exact:>12.1e}")
    out = dict(**info, layers=RESNET18_CIFAR, rows={k: v for k, v in rows}, ours_over_operator=ratio_op,
               authors_over_ours=ratio_auth, accuracy=acc)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()

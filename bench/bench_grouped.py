"""Grouped and depthwise convs: the conv-operator power step (specreg_fast::conv_power_step_,
one call for all layers) vs the plain-PyTorch loop (per layer F.conv2d + F.conv_transpose2d
with the layer's groups, normalize), on the grouped/depthwise layers of torchvision models
at the input sizes they see on a 64x64 image: MobileNetV3-small (depthwise 3x3/5x5),
ConvNeXt-tiny (depthwise 7x7), ResNeXt-50 32x4d (groups=32), RegNetX-400MF (group width 16).

    python bench/bench_grouped.py [--reps N] [--models a,b] [--n-iter K] [--kernels auto,aten,direct]

Reported per model and CPU conv kernel (``sf.conv.set_conv_kernel``: ``auto``, the default
routing, or forced ``aten`` / ``direct``): number of grouped layers, ours and reference per step
(median of interleaved repeats), their ratio, and the largest relative difference of the two
sigmas.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import specreg_fast as sf  # noqa: E402
from specreg_fast import conv, ops  # noqa: E402
from bench_conv import time_interleaved  # noqa: E402

MODELS = ("mobilenet_v3_small", "convnext_tiny", "resnext50_32x4d", "regnet_x_400mf")


def grouped_specs(name):
    """The model's convs with groups > 1, as ConvSpecs at the size they see on 64x64."""
    import torchvision.models as tvm

    torch.manual_seed(0)
    model = getattr(tvm, name)(num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pen = sf.SpectralPenalty(model, readout=None)
        model(torch.randn(1, 3, 64, 64))
        pen.layer_names
    return [sf.ConvSpec.from_module(mp.module, pen._input_shapes[mp.owner], weight=mp.module.weight.detach())
            for mp in pen._convs if mp.module.groups > 1]


def reference_steps(specs, xs, n_steps):
    """Per layer, per step: conv2d, normalize, its adjoint conv_transpose2d, normalize."""
    est = []
    with torch.no_grad():
        for spec, x in zip(specs, xs):
            W, xb, e = spec.weight, x[None], None
            for _ in range(n_steps):
                y = F.conv2d(xb, W, None, spec.stride, spec.padding, spec.dilation, spec.groups)
                y = y / torch.linalg.vector_norm(y)
                op = tuple(spec.input_shape[1 + i] - ((y.shape[2 + i] - 1) * spec.stride[i] - 2 * spec.padding[i]
                                                      + spec.dilation[i] * (W.shape[2 + i] - 1) + 1) for i in range(2))
                a = F.conv_transpose2d(y, W, None, spec.stride, spec.padding, op, spec.groups, spec.dilation)
                e = torch.linalg.vector_norm(a)
                xb = a / e
            x.copy_(xb[0])
            est.append(e)
    return torch.stack(est)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--n-iter", type=int, default=1)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--kernels", default="auto", help="comma list of auto, aten, direct")
    args = ap.parse_args(argv)
    print(f"grouped/depthwise conv operator step, cpu, {torch.get_num_threads()} threads, {args.reps} interleaved "
          f"reps (medians), n_iter={args.n_iter}")
    print(f"{'model':<22}{'kernel':>7}{'layers':>7}{'ours ms':>10}{'ref ms':>10}{'ratio':>8}{'max rel diff':>14}")
    for name in args.models.split(","):
        specs = grouped_specs(name)
        st = conv.init_conv_state(specs, generator=torch.Generator().manual_seed(1))
        xs_ref = [x.clone() for x in st.xs]
        params, modes = ops.pack_conv_params(specs)
        ws = [s.weight for s in specs]
        for kernel in args.kernels.split(","):
            previous = conv.set_conv_kernel(kernel)
            try:
                ours = lambda: ops.conv_power_step_(ws, st.xs, st.ys, params, modes, args.n_iter, 0.0)  # noqa: E731
                refr = lambda: reference_steps(specs, xs_ref, args.n_iter)  # noqa: E731
                t_ours, t_ref = time_interleaved([ours, refr], args.reps, "cpu")
                # same start, same number of steps: the two sigmas agree to rounding
                diff = ((ours() - refr()).abs() / refr()).max().item()
            finally:
                conv.set_conv_kernel(previous)
            print(f"{name:<22}{kernel:>7}{len(specs):>7}{t_ours * 1e3:>10.2f}{t_ref * 1e3:>10.2f}{t_ref / t_ours:>7.2f}x"
                  f"{diff:>14.1e}")

if __name__ == "__main__":
    main()

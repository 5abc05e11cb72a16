"""Conv-operator power iteration: the grouped C++ op (specreg_fast::conv_power_step_) vs the
plain-PyTorch loop (F.conv2d + F.conv_transpose2d + normalize, per layer) on the conv
shapes of ResNet-18 on CIFAR-10 (32x32 inputs).

Reported:
  * per-step time (one power step on all 11 layers, n_iter=1 per call as in training, and
    10 steps per call), ours vs reference, interleaved repeats, medians and their ratio;
  * time to tolerance (relative error 1e-3 and 1e-5 against 'exact' = float64 power
    iteration to relative change < 1e-9), cold start (random x) and warm start (the
    persistent x of the unperturbed weights after a 1e-3 relative weight perturbation, as
    between two training steps). Steps needed are counted per layer; the time is that
    many steps of each implementation, summed over layers.

    python bench/bench_conv.py [--reps N] [--json PATH] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from specreg_fast import conv, ops  # noqa: E402
from specreg_fast.reference import ConvSpec  # noqa: E402
from specreg_fast.benchmarks.suite import RESNET18_CIFAR  # noqa: E402  (C_in, C_out, k, stride, pad, size)


def make_specs(device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    specs = []
    for cin, cout, k, s, p, n in RESNET18_CIFAR:
        w = torch.randn(cout, cin, k, k, generator=g, dtype=torch.float64) * (2.0 / (cin * k * k)) ** 0.5
        specs.append(ConvSpec(weight=w.to(dtype).to(device), input_shape=(cin, n, n), stride=(s, s), padding=(p, p),
                              dilation=(1, 1)))
    return specs


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reference_steps(specs, xs, n_steps):
    """The plain loop: per layer, per step, conv2d, normalize, conv_transpose2d, normalize."""
    est = []
    with torch.no_grad():
        for spec, x in zip(specs, xs):
            W = spec.weight
            xb = x[None]
            e = None
            for _ in range(n_steps):
                y = F.conv2d(xb, W, None, spec.stride, spec.padding)
                y = y / torch.linalg.vector_norm(y)
                op = tuple(spec.input_shape[1 + i] - ((y.shape[2 + i] - 1) * spec.stride[i] - 2 * spec.padding[i]
                                                      + W.shape[2 + i]) for i in range(2))
                a = F.conv_transpose2d(y, W, None, spec.stride, spec.padding, op)
                e = torch.linalg.vector_norm(a)
                xb = a / e
            x.copy_(xb[0])
            est.append(e)
    return est


def time_interleaved(fns, reps, device):
    """Median seconds of each fn, the fns called in turn within each repeat."""
    times = [[] for _ in fns]
    for fn in fns:  # warm-up
        fn()
    for _ in range(reps):
        for i, fn in enumerate(fns):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def per_step(specs, device, reps, n_iter):
    st = conv.init_conv_state(specs, generator=torch.Generator().manual_seed(1))
    xs_ref = [x.clone() for x in st.xs]
    params, modes = ops.pack_conv_params(specs)
    ws = [s.weight for s in specs]
    ours = lambda: ops.conv_power_step_(ws, st.xs, st.ys, params, modes, n_iter, 0.0)  # noqa: E731
    refr = lambda: reference_steps(specs, xs_ref, n_iter)  # noqa: E731
    t_ours, t_ref = time_interleaved([ours, refr], reps, device)
    return dict(n_iter=n_iter, ours_s=t_ours, reference_s=t_ref, speedup=t_ref / t_ours)


def exact_sigmas(specs):
    specs64 = [ConvSpec(**{**s.__dict__, "weight": s.weight.double()}) for s in specs]
    st = conv.init_conv_state(specs64, generator=torch.Generator().manual_seed(7))
    return conv.conv_operator_norms(specs64, st, tol=1e-9, max_iter=5000).detach().cpu(), st


def steps_to_tol(spec, x0, exact, tol, limit=3000):
    """Steps of the op (float32) until the estimate is within tol (relative) of exact."""
    st = conv.ConvState([x0.clone().float()], [torch.zeros(0)])
    st.ys[0] = torch.empty(conv._output_shape(spec, "l"), dtype=torch.float32, device=x0.device)
    params, modes = ops.pack_conv_params([spec])
    for k in range(1, limit + 1):
        s = ops.conv_power_step_([spec.weight], st.xs, st.ys, params, modes, 1, 0.0)
        if abs(s.item() - exact) <= tol * exact:
            return k
    return limit


def time_to_tol(specs, device, reps, tol, warm):
    g = torch.Generator().manual_seed(11)
    if warm:
        # persistent vectors converged on W, then W moves by 1e-3 (relative): a training step
        _, st0 = exact_sigmas(specs)
        starts = [x.float() for x in st0.xs]
        specs = [ConvSpec(**{**s.__dict__, "weight": s.weight + 1e-3 * s.weight.norm() / s.weight.numel() ** 0.5
                             * torch.randn(s.weight.shape, generator=g).to(s.weight)}) for s in specs]
    else:
        starts = []
        for s in specs:
            x = torch.randn(s.input_shape, generator=g).to(device)
            starts.append(x / x.norm())
    exact, _ = exact_sigmas(specs)
    steps = [steps_to_tol(s, x0, float(e), tol) for s, x0, e in zip(specs, starts, exact)]
    t_ours = t_ref = 0.0
    for s, x0, k in zip(specs, starts, steps):
        params, modes = ops.pack_conv_params([s])
        x_o = x0.clone()
        y_o = torch.empty(conv._output_shape(s, "l"), device=device)
        x_r = x0.clone()

        def ours():
            x_o.copy_(x0)
            ops.conv_power_step_([s.weight], [x_o], [y_o], params, modes, k, 0.0)

        def refr():
            x_r.copy_(x0)
            reference_steps([s], [x_r], k)

        a, b = time_interleaved([ours, refr], reps, device)
        t_ours += a
        t_ref += b
    return dict(tol=tol, start="warm" if warm else "cold", steps=steps, ours_s=t_ours, reference_s=t_ref,
                speedup=t_ref / t_ours)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-tol", action="store_true", help="skip the time-to-tolerance rows")
    args = ap.parse_args(argv)
    specs = make_specs(args.device)
    res = dict(device=args.device, threads=torch.get_num_threads(), torch=torch.__version__,
               layers=RESNET18_CIFAR, per_step=[], to_tol=[])
    print(f"ResNet-18/CIFAR conv operator norms, {args.device}, {torch.get_num_threads()} threads, "
          f"{args.reps} interleaved reps (medians)")
    print(f"{'row':<34}{'ours ms':>10}{'ref ms':>10}{'ratio':>8}")
    for n_iter in (1, 10):
        r = per_step(specs, args.device, args.reps, n_iter)
        res["per_step"].append(r)
        print(f"{f'per call, n_iter={n_iter}':<34}{r['ours_s'] * 1e3:>10.2f}{r['reference_s'] * 1e3:>10.2f}"
              f"{r['speedup']:>7.2f}x")
    if not args.no_tol:
        for tol in (1e-3, 1e-5):
            for warm in (False, True):
                r = time_to_tol(specs, args.device, max(3, args.reps // 5), tol, warm)
                res["to_tol"].append(r)
                label = "to tol %g, %s (%d steps)" % (tol, r["start"], sum(r["steps"]))
                print(f"{label:<34}{r['ours_s'] * 1e3:>10.2f}"
                      f"{r['reference_s'] * 1e3:>10.2f}{r['speedup']:>7.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    main()

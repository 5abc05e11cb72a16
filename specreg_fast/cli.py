"""Command line: ``specreg-fast demo`` (sigma of every layer of a small CNN, exact vs fast),
``specreg-fast reproduce`` (the paper's comparison on packaged data), ``specreg-fast bench``
(kernel benchmarks against plain PyTorch)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn

from . import reference as ref
from .conv import conv_operator_norms, init_conv_state
from .dense import init_power_state, spectral_norms


def _small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.GELU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.GELU(),
        nn.Flatten(), nn.Linear(16 * 6 * 6, 32), nn.GELU(),
        nn.Linear(32, 10),
    )


def demo(args) -> int:
    """sigma_max of every layer of a small CNN: exact (SVD of the explicit operator) next to
    the power-iteration estimates, and the reshaped-kernel matrix norm that
    torch.nn.utils.spectral_norm would use for the convs."""
    torch.manual_seed(args.seed)
    model = _small_cnn()
    x = torch.randn(1, 1, 12, 12)
    shapes = {}
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.__setitem__(m, tuple(i[0].shape[1:])))
             for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]
    model(x)
    for h in hooks:
        h.remove()
    layers = [(f"{i}", m) for i, m in enumerate(model) if isinstance(m, (nn.Conv2d, nn.Linear))]
    dense = [m.weight.detach() for _, m in layers if isinstance(m, nn.Linear)]
    st = init_power_state(dense, generator=torch.Generator().manual_seed(args.seed))
    t0 = time.perf_counter()
    fast = spectral_norms(dense, st, n_iter=args.iters).tolist()
    t_fast = time.perf_counter() - t0
    print(f"sigma_max per layer of a small CNN at input 1x12x12 ({args.iters} power-iteration steps)\n")
    head = f"{'layer':<6}{'kind':<26}{'exact':>10}{'power it.':>11}{'rel.err':>10}{'matrix norm':>13}{'circular':>10}"
    print(head)
    print("-" * len(head))
    k = 0
    for name, m in layers:
        if isinstance(m, nn.Linear):
            exact = ref.dense_sigma_exact(m.weight).item()
            est = fast[k]
            k += 1
            mat = exact
            circ = float("nan")
            kind = f"Linear {m.in_features}->{m.out_features}"
        else:
            spec = ref.ConvSpec.from_module(m, shapes[m])
            exact = ref.conv_sigma_exact(spec).item()
            st_c = init_conv_state([spec], generator=torch.Generator().manual_seed(args.seed))
            with torch.no_grad():
                est = conv_operator_norms([spec], st_c, n_iter=args.iters).item()
            mat = ref.dense_sigma_exact(m.weight.reshape(m.weight.shape[0], -1)).item()
            circ = ref.circular_conv_sigma_exact(m.weight, shapes[m][1:], m.stride, m.dilation).item()
            kind = f"Conv2d {m.in_channels}->{m.out_channels} k{m.kernel_size[0]} s{m.stride[0]}"
        print(f"{name:<6}{kind:<26}{exact:>10.4f}{est:>11.4f}{abs(est - exact) / exact:>10.1e}{mat:>13.4f}{circ:>10.4f}")
    print(f"\nexact: SVD of the explicit operator; power it.: the grouped C++ ops (dense: "
          f"{t_fast * 1e3:.2f} ms for all Linear layers; convs: the conv-operator op);\n"
          f"matrix norm: the reshaped kernel (what torch.nn.utils.spectral_norm bounds); "
          f"circular: the exact norm with wrap-around padding (the paper's FFT method).")
    return 0


def reproduce(args) -> int:
    """Vanilla vs ll-spectral vs rep-spectral on packaged data, attacked after the readout is
    refitted on frozen features (see specreg_fast.experiments)."""
    from . import experiments as E

    if args.sweep_gamma:
        if args.gamma is not None:
            print("specreg-fast reproduce: --sweep-gamma runs gamma in "
                  f"{', '.join(f'{g:g}' for g in E.SWEEP_GAMMAS)}; drop --gamma", file=sys.stderr)
            return 2
        cfg = E.sweep_gamma_config(args.out or "sweep_out")
    elif args.full:
        cfg = E.full_config(args.out or "reproduce_out")
    else:
        cfg = E.Config(out_dir=args.out or "demo_out")
    if args.cases:
        cfg.cases = tuple(c.strip() for c in args.cases.split(",") if c.strip())
        unknown = [c for c in cfg.cases if c not in E.CASES]
        if unknown:
            print(f"specreg-fast reproduce: unknown case(s) {', '.join(unknown)}; expected some of "
                  f"{', '.join(E.CASES)}", file=sys.stderr)
            return 2
    if args.data_dir is not None:
        if not os.path.isdir(args.data_dir):
            print(f"specreg-fast reproduce: --data-dir {args.data_dir} is not a folder", file=sys.stderr)
            return 2
        cfg.data_dir = args.data_dir
        if not args.cases:
            cfg.cases = tuple(cfg.cases) + E.DATA_DIR_CASES
    needs = [c for c in cfg.cases if c in E.DATA_DIR_CASES]
    if needs and cfg.data_dir is None:
        print(f"specreg-fast reproduce: case(s) {', '.join(needs)} read the original dataset files: give "
              f"--data-dir", file=sys.stderr)
        return 2
    if args.limit_train is not None:
        cfg.data_limit_train = args.limit_train
    if args.gamma is not None:
        if not (args.gamma >= 0 and args.gamma < float("inf")):
            print(f"specreg-fast reproduce: --gamma must be a finite number >= 0, got {args.gamma}", file=sys.stderr)
            return 2
        cfg.gamma_mlp = cfg.gamma_cnn = args.gamma
    if args.seeds is not None:
        cfg.seeds = tuple(range(args.seeds))
    if args.no_progress:
        cfg.progress = False
    gammas = E.SWEEP_GAMMAS if args.sweep_gamma else (cfg.gamma_mlp,)
    print(f"specreg-fast reproduce: cases {', '.join(cfg.cases)}; seeds {list(cfg.seeds)}"
          f"{'' if cfg.cnn_seeds is None else f' ({list(cfg.cnn_seeds)} for the CNNs and transfer)'}; "
          f"{cfg.attack_points} attacked points ({'/'.join(cfg.attacks)}); gamma {', '.join(f'{g:g}' for g in gammas)} "
          f"(MLP/CNN), {cfg.gamma_toy:g} (toy); output in {cfg.out_dir}/")
    if args.reuse_run is not None and not args.sweep_gamma:
        print("specreg-fast reproduce: --reuse-run goes with --sweep-gamma", file=sys.stderr)
        return 2
    reused = 0
    if args.reuse_run is not None:
        try:
            E.load_runs(args.reuse_run, cfg, gammas)
        except (OSError, ValueError, KeyError) as e:
            print(f"specreg-fast reproduce: --reuse-run {args.reuse_run}: {e}", file=sys.stderr)
            return 2
        reused = 1
    # the sweep trains vanilla once: every gamma after the first costs two arms of three
    n_runs = 1 + (len(gammas) - 1) * 2 / 3 if reused == 0 else (len(gammas) - 1) * 2 / 3
    est = E.estimate_minutes(cfg) * n_runs
    print(f"estimate: about {est:.0f} minutes on a 2-core CPU (scaled from runs measured on this project's machine)")
    if args.sweep_gamma:
        E.sweep_gamma(cfg, reuse=args.reuse_run)
    else:
        E.reproduce(cfg)
    return 0


def bench(args) -> int:
    """Dense, conv, circular-norm and training-overhead benchmarks against plain PyTorch."""
    from .benchmarks import suite

    if args.models is not None:
        return bench_models(args)
    size = args.sizes or ("quick" if args.quick else "full")
    try:
        res = suite.run(size, args.device, progress=lambda s: print(f"... {s}", file=sys.stderr, flush=True))
    except ValueError as e:
        print(f"specreg-fast bench: {e}", file=sys.stderr)
        return 2
    suite.print_table(res)
    if args.json:
        suite.to_json(res, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        suite.plot(res, args.plot)
        print(f"wrote {args.plot}")
    return 0


def bench_models(args) -> int:
    """The penalty's cost on real models (specreg_fast.benchmarks.models)."""
    from .benchmarks import models

    if args.models == "all":
        names = models.QUICK if args.quick else list(models.MODELS)
    else:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
    try:
        rounds = args.rounds if args.rounds is not None else (5 if args.quick else models.MIN_ROUNDS)
        res = models.run(names, batch=args.batch, rounds=rounds, every=args.every, image_size=args.image_size,
                         device=args.device,
                         progress=lambda s: print(f"... {s}", file=sys.stderr, flush=True))
    except ValueError as e:
        print(f"specreg-fast bench: {e}", file=sys.stderr)
        return 2
    models.print_table(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="specreg-fast", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="sigma_max of every layer of a small CNN: exact vs estimated")
    d.add_argument("--iters", type=int, default=50)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=demo)
    r = sub.add_parser("reproduce", help="the paper's comparison (vanilla / ll-spectral / rep-spectral) on packaged data")
    r.add_argument("--full", action="store_true", help="the authors' settings where they fit in two hours (5 seeds "
                                                       "MLP/toys, 3 CNNs; ~2,000 penalized MLP steps; 3 attacks)")
    r.add_argument("--cases", default=None, help="comma list of toy-xor, toy-sine, mnist-mlp, mnist-cnn, "
                                                 "mnist-cnn-circular, transfer, mnist-full-mlp, cifar-cnn (the last two "
                                                 "need --data-dir)")
    r.add_argument("--data-dir", default=None, help="folder with the original MNIST idx files and/or CIFAR-10 python "
                                                    "batches: adds the cases mnist-full-mlp and cifar-cnn")
    r.add_argument("--gamma", type=float, default=None, help="penalty weight of the MLP and CNN cases (default 1e-2; "
                                                             "the authors sweep 1e-3, 1e-2, 1e-1)")
    r.add_argument("--sweep-gamma", action="store_true", help="the authors' gamma sweep (1e-3, 1e-2, 1e-1) on the "
                                                              "MNIST MLP at the full step budget, one folder per gamma")
    r.add_argument("--reuse-run", default=None, help="with --sweep-gamma: the results.json of an earlier run with "
                                                     "the same budget at one of the sweep's gammas (e.g. of reproduce "
                                                     "--full --cases mnist-mlp); its runs are taken, not retrained")
    r.add_argument("--limit-train", type=int, default=None, help="use only the first N training images of the "
                                                                 "full datasets")
    r.add_argument("--seeds", type=int, default=None, help="number of seeds")
    r.add_argument("--out", default=None, help="output folder")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=reproduce)
    b = sub.add_parser("bench", help="kernel benchmarks against plain PyTorch, one table")
    b.add_argument("--quick", action="store_true", help="fewer shapes and repeats (under 2 minutes on 2 cores)")
    b.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    b.add_argument("--json", default=None, help="write every row and the machine info to this file")
    b.add_argument("--plot", default=None, help="write a PNG bar chart of the ratios")
    b.add_argument("--sizes", default=None, choices=("full", "quick", "tiny"), help=argparse.SUPPRESS)
    b.add_argument("--models", nargs="?", const="all", default=None,
                   help="instead: the penalty's cost on real models (comma list of resnet50, vit_b_16, convnext_tiny, "
                        "efficientnet_b0, mobilenet_v3_small, regnet_x_400mf, densenet121, swin_t, resnext50_32x4d, "
                        "gpt2-tiny, vit_b_16-lora; default all, with --quick resnet50 and convnext_tiny): as a share "
                        "of a training step with a bootstrap interval, vs the reference loop and vs the floor")
    b.add_argument("--batch", type=int, default=32, help="with --models: the training step's batch size")
    b.add_argument("--rounds", type=int, default=None, help="with --models: interleaved rounds (default 15, with "
                                                            "--quick 5; fewer than 15 give no verdict)")
    b.add_argument("--every", type=int, default=4, help="with --models: k of the accumulate_grad every=k row "
                                                        "(1: no such row)")
    b.add_argument("--image-size", type=int, default=64, help="with --models: the images' height and width")
    b.set_defaults(func=bench)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

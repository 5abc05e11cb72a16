"""The penalty on FSDP2-sharded weights: bytes communicated and time per penalty step.

    python bench/bench_distributed.py [--ranks 2 4] [--repeats 15] [--json out.json]

Two ways to compute the penalty of a model whose weights FSDP2 shards on dim 0 (gloo ranks
on CPU, spawned here), on the MLP (784-1024x3-10) and ResNet-18 (CIFAR, 32x32) of the
package's benchmark suite, hidden layers, n_iter=1:

* ours: ``SpectralPenalty`` on the sharded model (specreg_fast/distributed.py): one
  all-reduce per step of the vectors of every layer, gradients on the shards;
* naive: ``full_tensor()`` of every regularized weight (an all-gather each) into a plain copy
  of the model, the single-process ``SpectralPenalty`` there, the gradient's local rows.

Bytes: the payload of every collective of one penalty step, per rank (ours measured from the
all-reduce calls; naive = the gathered weights' size), the number of collectives
(CommDebugMode), and a ring-algorithm estimate of the bytes each rank sends (labelled as an
estimate: all-reduce 2 (R-1)/R x payload, all-gather (R-1)/R x gathered size). Time: median
seconds of one penalty step with its backward (value + gradient), both ways timed
interleaved at 2 ranks only (4 processes on a 2-core machine measure contention), and the
single-process penalty on the full model on rank 0 while the other rank waits.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from specreg_fast.benchmarks.suite import make_mlp, make_resnet18  # noqa: E402

MODELS = {"mlp": make_mlp, "resnet18": make_resnet18}


def _shard(model):
    from torch.distributed.fsdp import fully_shard

    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            fully_shard(m)
    fully_shard(model)
    return model


def _setup(make):
    import specreg_fast as sf

    torch.manual_seed(0)
    model, in_shape = make()
    model = _shard(model)
    pen = sf.SpectralPenalty(model, gamma=1e-2)
    model(torch.zeros(2, *in_shape))  # conv input sizes and the readout
    pen.layer_names
    torch.manual_seed(0)
    plain = make()[0]
    plain_pen = sf.SpectralPenalty(plain, gamma=1e-2)
    plain(torch.zeros(2, *in_shape))
    plain_pen.layer_names
    names = pen.layer_names
    mods = dict(model.named_modules())
    sharded = [mods[n].weight for n in names]
    plain_ws = [dict(plain.named_modules())[n].weight for n in names]
    return model, pen, plain, plain_pen, sharded, plain_ws


def _ours(pen, sharded):
    def step():
        for W in sharded:
            W.grad = None
        pen().backward()
    return step


def _naive(plain_pen, sharded, plain_ws):
    def step():
        with torch.no_grad():
            for W, P in zip(sharded, plain_ws):
                P.copy_(W.full_tensor())
                P.grad = None
        plain_pen().backward()
        for W, P in zip(sharded, plain_ws):  # the gradient's local rows, as FSDP2 would keep them
            W.grad = None
            rows = W.to_local().shape[0]
            _ = P.grad[:rows]
    return step


def _payload(fn):
    """Collective counts (CommDebugMode) and the all-reduce payload bytes of one call."""
    from torch.distributed.tensor.debug import CommDebugMode

    sent = []
    orig = dist.all_reduce

    def recording(t, *a, **k):
        sent.append(t.numel() * t.element_size())
        return orig(t, *a, **k)

    dist.all_reduce = recording
    try:
        with CommDebugMode() as comm:
            fn()
    finally:
        dist.all_reduce = orig
    return {str(k): v for k, v in comm.get_comm_counts().items()}, sum(sent)


def _worker(rank, world, out_dir, repeats):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    rows = []
    try:
        for label, make in MODELS.items():
            model, pen, plain, plain_pen, sharded, plain_ws = _setup(make)
            ours, naive = _ours(pen, sharded), _naive(plain_pen, sharded, plain_ws)
            ours()  # the first call's n_iter_init steps
            counts_ours, bytes_ours = _payload(ours)
            counts_naive, _ = _payload(naive)
            gathered = sum(W.numel() * W.element_size() for W in sharded)
            r = {"model": label, "ranks": world, "collectives_ours": counts_ours, "collectives_naive": counts_naive,
                 "payload_bytes_ours": bytes_ours, "payload_bytes_naive": gathered,
                 "payload_ratio_naive_to_ours": gathered / bytes_ours,
                 "ring_send_bytes_estimate_ours": 2 * (world - 1) / world * bytes_ours,
                 "ring_send_bytes_estimate_naive": (world - 1) / world * gathered,
                 "weight_bytes": gathered}
            if world == 2:
                # min_time=0: one call per sample on every rank, so the ranks' collectives pair up
                t = common.interleaved({"ours": ours, "naive": naive}, repeats=repeats, min_time=0.0)
                r.update({"ours_s": t["ours"]["median"], "naive_s": t["naive"]["median"],
                          "naive_over_ours": t["naive"]["median"] / t["ours"]["median"]})
                dist.barrier()
                if rank == 0:  # the single-process penalty on the full weights, alone
                    one = common.interleaved({"single": _ours(plain_pen, plain_ws)}, repeats=repeats, min_time=0.0)
                    r.update({"single_process_s": one["single"]["median"],
                              "ours_over_single_process": r["ours_s"] / one["single"]["median"]})
                dist.barrier()
            rows.append(r)
        if rank == 0:
            torch.save(rows, os.path.join(out_dir, "rows.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # as in python_tests/test_penalty_ddp.py: no gloo teardown at exit


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows = []
    for world in a.ranks:
        with tempfile.TemporaryDirectory() as d:
            mp.spawn(_worker, args=(world, d, a.repeats), nprocs=world, join=True)
            rows += torch.load(os.path.join(d, "rows.pt"), weights_only=False)
    for r in rows:
        line = (f"{r['model']:9s} {r['ranks']} ranks: payload/rank ours {r['payload_bytes_ours'] / 1e3:9.1f} kB "
                f"({r['collectives_ours']}), naive {r['payload_bytes_naive'] / 1e3:9.1f} kB "
                f"({r['collectives_naive']}): naive/ours {r['payload_ratio_naive_to_ours']:.2f}")
        if "ours_s" in r:
            line += (f"; step ours {common.fmt_time(r['ours_s'])}, naive {common.fmt_time(r['naive_s'])} "
                     f"(naive/ours {r['naive_over_ours']:.2f})")
            if "single_process_s" in r:
                line += f", single process {common.fmt_time(r['single_process_s'])}"
        print(line)
    if a.json:
        common.save_json(a.json, rows)


if __name__ == "__main__":
    main()

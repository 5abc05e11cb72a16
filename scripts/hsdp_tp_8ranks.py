"""HSDP x TP on 8 gloo ranks, run by hand (not in the suite: 8 processes):

    python scripts/hsdp_tp_8ranks.py

A (2, 2, 2) ("dp_replicate", "dp_shard", "tp") mesh; the MLP with ColwiseParallel then
RowwiseParallel on "tp", then fully_shard per layer on ("dp_replicate", "dp_shard"). 20 steps
of penalty() training on each rank's batch against the single-process run on their
concatenation (penalties and every rank's box of every parameter, rel 1e-5), and the
all-reduces of one pen() (n_iter=2) per process group. Exits non-zero on a mismatch."""
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout

STEPS, WORLD, DP = 20, 8, 4


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 7), nn.Tanh(), nn.Linear(7, 3))


def _batches():
    g = torch.Generator().manual_seed(5)
    return [[torch.randn(2, 6, generator=g) for _ in range(DP)] for _ in range(STEPS)]


def _train(model, pen, dp):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    hist = []
    for xs in _batches():
        x = torch.cat(xs) if dp is None else xs[dp]
        opt.zero_grad()
        data = model(x).square().mean()
        p = pen()
        (data + p).backward()
        opt.step()
        hist.append(float(p.detach()))
    return hist


def _worker(rank, out):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=WORLD)
    import specreg_fast as sf
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, 2, 2), mesh_dim_names=("dp_replicate", "dp_shard", "tp"))

    def build():
        model = _mlp()
        pen = sf.SpectralPenalty(model, gamma=0.05, seed=11)
        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        for i in (0, 2, 4):
            fully_shard(model[i], mesh=mesh["dp_replicate", "dp_shard"])
        fully_shard(model, mesh=mesh["dp_replicate", "dp_shard"])
        return model, pen

    dp = rank // 2  # the (replicate, shard) coordinates, flattened
    model, pen = build()
    hist = _train(model, pen, dp)
    boxes = []
    for n, p in model.named_parameters():
        _, off = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        boxes.append((n, tuple(str(q) for q in p.placements), p.to_local().detach().clone(), tuple(off)))
    model, pen = build()
    pen.n_iter = 2
    model(_batches()[0][dp])
    pen()  # the warm start
    groups, real = {}, dist.all_reduce

    def counted(t, *a, group=None, **k):
        key = str(dist.get_process_group_ranks(group))
        groups[key] = groups.get(key, 0) + 1
        return real(t, *a, group=group, **k)

    dist.all_reduce = counted
    try:
        with CommDebugMode() as comm:
            pen()
    finally:
        dist.all_reduce = real
    torch.save({"hist": hist, "boxes": boxes, "groups": groups,
                "comm": {str(k): v for k, v in comm.get_comm_counts().items()}}, f"{out}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def main():
    import specreg_fast as sf

    out = tempfile.mkdtemp()
    t0 = time.time()
    mp.spawn(_worker, args=(out,), nprocs=WORLD)
    spawn_s = time.time() - t0
    model = _mlp()
    hist = _train(model, sf.SpectralPenalty(model, gamma=0.05, seed=11), None)
    full = {n: p.detach() for n, p in model.named_parameters()}
    worst = 0.0
    for r in range(WORLD):
        res = torch.load(f"{out}/rank{r}.pt", weights_only=False)
        worst = max(worst, max(abs(a - b) for a, b in zip(res["hist"], hist)) / max(hist))
        for n, placements, local, off in res["boxes"]:
            ref = full[n][tuple(slice(o, o + s) for o, s in zip(off, local.shape))]
            if local.numel():
                worst = max(worst, float((local - ref).abs().max() / ref.abs().max().clamp_min(1e-12)))
            if r == 0:
                print(n, placements)
        print(f"rank {r}: all-reduces of one pen() (n_iter=2) {res['comm']}, per group (ranks) {res['groups']}")
    print(f"{WORLD} ranks in {spawn_s:.0f} s; worst relative error (penalties, weights after {STEPS} steps) "
          f"{worst:.2e}")
    sys.exit(0 if worst <= 1e-5 else 1)


if __name__ == "__main__":
    main()

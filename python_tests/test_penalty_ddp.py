"""SpectralPenalty under DistributedDataParallel: 2 ranks on gloo over loopback."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn


def _worker(rank, world, out_dir, mode):
    import specreg_fast as sf

    # Rendezvous through a file (no port to race for); gloo itself talks over loopback.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same initial weights on every rank
        model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 16),
                              nn.ReLU(), nn.Linear(16, 4))
        ddp = nn.parallel.DistributedDataParallel(model)
        pen = sf.SpectralPenalty(ddp, gamma=0.05, seed=11)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(100 + rank)  # different data per rank
        for _ in range(5):
            x = torch.randn(8, 1, 6, 6, generator=g)
            opt.zero_grad()
            if mode == "loss":
                (ddp(x).square().mean() + pen()).backward()
            else:  # the gradient written in place after the (all-reduced) backward
                ddp(x).square().mean().backward()
                pen.accumulate_grad()
            opt.step()
        flat = torch.cat([b.flatten().double() for _, b in sorted(pen.named_buffers())] +
                         [p.detach().flatten().double() for p in model.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        if rank == 0:
            torch.save({"flat": gathered, "sigmas": pen.sigmas()}, os.path.join(out_dir, "ddp.pt"))
        # both ranks leave together: tearing gloo down while the peer is still
        # communicating aborts the process
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without running C++ static destructors: gloo's and DDP's background threads can
    # still be winding down, and their teardown at interpreter exit aborted the process
    # ("terminate called without an active exception") on the loaded 2-core machine. The
    # results are already saved; exit code 0 tells mp.spawn the rank succeeded.
    os._exit(0)


@pytest.mark.parametrize("mode", ["loss", "accumulate_grad"])
def test_ddp_two_ranks_stay_identical(tmp_path, mode):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_worker, args=(2, str(tmp_path), mode), nprocs=2, join=True)
    res = torch.load(tmp_path / "ddp.pt")
    a, b = res["flat"]
    # vectors, counters, sigmas and weights bit-identical across ranks after 5 steps
    assert torch.equal(a, b)
    assert set(res["sigmas"]) == {"0", "3"}  # the DDP wrapper is unwrapped; readout "5" left out


class _AttnNet(nn.Module):
    """An attention block, a Linear and a custom map (extra=): the kinds whose weights are not
    a module's ``weight``."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.randn(8, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.attn(x, x, x, need_weights=False)[0]
        return self.head(torch.tanh(self.fc(h) + h @ self.scale.t())).mean(1)


def _attn_penalty(wrapped, model):
    import specreg_fast as sf
    return sf.SpectralPenalty(wrapped, gamma=0.05, readout="head", seed=3, extra={"scale": lambda: model.scale})


def _attn_run(ddp, model, pen, mode, data):
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for x in data:
        opt.zero_grad()
        if mode == "loss":
            (ddp(x).square().mean() + pen()).backward()
        else:
            ddp(x).square().mean().backward()
            pen.accumulate_grad()
        opt.step()
    return pen.sigmas(), [p.detach().clone() for p in model.parameters()]


def _kinds_worker(rank, world, out_dir):
    """DDP with an attention block and an extra= map (their weights are not `m.weight`); FSDP2
    refusing the extra= map with an error that names it (the attention blocks are supported); a transformers Conv1D passed to
    fully_shard itself (FSDP2 swaps its class) still found."""
    import warnings

    import specreg_fast as sf
    from torch.distributed.fsdp import fully_shard
    from transformers.pytorch_utils import Conv1D

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        res = {}
        data = [torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(s)) for s in range(3)]  # same on all ranks
        for mode in ("loss", "accumulate_grad"):
            torch.manual_seed(0)
            model = _AttnNet()
            ddp = nn.parallel.DistributedDataParallel(model)
            res[mode] = _attn_run(ddp, model, _attn_penalty(ddp, model), mode, data)
        torch.manual_seed(0)
        sharded = _AttnNet()
        fully_shard(sharded.attn)
        fully_shard(sharded)
        pen = _attn_penalty(sharded, sharded)
        sharded(data[0])
        try:
            pen()
            res["fsdp_attn"] = None
        except ValueError as e:
            res["fsdp_attn"] = str(e)
        torch.manual_seed(0)
        gpt = nn.Sequential(Conv1D(6, 4), nn.Tanh(), nn.Linear(6, 2))
        fully_shard(gpt[0])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pen = sf.SpectralPenalty(gpt, gamma=0.05, readout="2")
        res["conv1d_class"] = type(gpt[0]).__name__
        res["conv1d_warned"] = [str(w.message) for w in caught if "not regularized" in str(w.message)]
        res["conv1d_names"] = pen.layer_names
        torch.save(res, os.path.join(out_dir, f"kinds{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)


def test_attention_extra_and_fsdp_conv1d_under_a_process_group(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    pytest.importorskip("transformers")
    mp.spawn(_kinds_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"kinds{r}.pt") for r in range(2)]
    data = [torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    for mode in ("loss", "accumulate_grad"):
        # the same data on both ranks: DDP's averaged gradient is the single process's
        torch.manual_seed(0)
        model = _AttnNet()
        want_sig, want_params = _attn_run(model, model, _attn_penalty(model, model), mode, data)
        for r in ranks:
            sig, params = r[mode]
            assert set(sig) == {"attn[q]", "attn[k]", "attn[v]", "attn.out_proj", "fc", "scale"}
            for k in want_sig:
                assert abs(sig[k] - want_sig[k]) <= 1e-5 * want_sig[k], (mode, k)
            for p, q in zip(params, want_params):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for r in ranks:
        # FSDP2 shards in_proj_weight's rows: the q/k/v row blocks are supported (see
        # test_distributed_maps.py); the extra= map is refused by name, with the reason
        msg = r["fsdp_attn"]
        assert msg is not None and "scale (an extra= map" in msg and "attn[" not in msg, msg
        assert r["conv1d_class"] != "Conv1D"  # FSDP2 swapped the class ...
        assert r["conv1d_warned"] == [] and r["conv1d_names"] == ["0"]  # ... and the layer is still found

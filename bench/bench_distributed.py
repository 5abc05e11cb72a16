"""The penalty on FSDP2-sharded weights: bytes communicated and time per penalty step.

    python bench/bench_distributed.py [--ranks 2 4] [--repeats 15] [--models ...] [--json out.json]

Two ways to compute the penalty of a model whose weights are sharded (gloo ranks on CPU,
spawned here), hidden layers, n_iter=1, on

* the MLP (784-1024x3-10) and ResNet-18 (CIFAR, 32x32) of the package's benchmark suite,
  FSDP2 per layer (rows ``mlp``, ``resnet18``);
* a tiny transformers Llama (4 decoder layers, hidden 256, MLP 688, vocab 1024, built from
  a config) under FSDP2 per decoder layer (``llama_fsdp2``: row blocks, and the q/k/v/o and
  MLP maps) and under Megatron tensor parallelism (``llama_tp``: ColwiseParallel on q/k/v,
  gate, up; RowwiseParallel on o, down: column blocks, 2 all-reduces per iteration);
* a tiny transformers GPT-2 (4 blocks, n_embd 256) under FSDP2 per block (``gpt2_fsdp2``:
  its Conv1D weights are (in, out), so FSDP2's dim-0 shard is a column block of each map).

The two ways:

* ours: ``SpectralPenalty`` on the sharded model (specreg_fast/distributed.py): one
  all-reduce per step of the vectors of every layer, gradients on the shards;
* naive: ``full_tensor()`` of every regularized parameter (an all-gather each) into a plain
  copy of the model, the single-process ``SpectralPenalty`` there, the gradient's local shard.

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

def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(cfg), None


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=1024, n_positions=64)
    return GPT2LMHeadModel(cfg), None


# label -> (model factory, sharding): "layers" (FSDP2 per Linear/Conv2d, then the root),
# "blocks" (FSDP2 per transformer block, then the root), "tp" (Llama: Colwise/Rowwise)
MODELS = {"mlp": (make_mlp, "layers"), "resnet18": (make_resnet18, "layers"),
          "llama_fsdp2": (_tiny_llama, "blocks"), "llama_tp": (_tiny_llama, "tp"), "gpt2_fsdp2": (_tiny_gpt2, "blocks")}
_TP_PLAN = {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
            "self_attn.o_proj": "rowwise", "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise",
            "mlp.down_proj": "rowwise"}


def _blocks(model):
    return model.model.layers if hasattr(model, "model") else model.transformer.h


def _shard(model, how):
    from torch.distributed.fsdp import fully_shard

    if how == "tp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        plan = {k: ColwiseParallel() if v == "colwise" else RowwiseParallel() for k, v in _TP_PLAN.items()}
        for block in _blocks(model):
            parallelize_module(block, mesh, plan)
        return model
    for m in (model.modules() if how == "layers" else _blocks(model)):
        if how == "blocks" or isinstance(m, (nn.Linear, nn.Conv2d)):
            fully_shard(m)
    fully_shard(model)
    return model


def _example(model, in_shape):
    """A batch of the model's input (token ids for the transformers models; the same on every rank)."""
    return torch.zeros(2, 8, dtype=torch.long) if in_shape is None else torch.zeros(2, *in_shape)


def _regularized_params(pen, model):
    """``[(module name, attribute)]`` of the parameters the penalty's maps are views of,
    each once, in map order."""
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for mp in pen._layers:
        key = (names[id(mp.module)], mp.attr)
        if key not in out:
            out.append(key)
    return out


def _setup(make, how):
    import specreg_fast as sf
    from specreg_fast.distributed import _fsdp_sharded_weights

    torch.manual_seed(0)
    model, in_shape = make()
    model = _shard(model, how)
    pen = sf.SpectralPenalty(model, gamma=1e-2)
    model(_example(model, in_shape))  # conv input sizes and the readout
    pen.layer_names
    torch.manual_seed(0)
    plain = make()[0]
    plain_pen = sf.SpectralPenalty(plain, gamma=1e-2)
    plain(_example(plain, in_shape))
    plain_pen.layer_names
    assert plain_pen.layer_names == pen.layer_names
    keys = _regularized_params(pen, model)
    fsdp = _fsdp_sharded_weights(model)
    mods, plain_mods = dict(model.named_modules()), dict(plain.named_modules())
    sharded = [fsdp.get((id(mods[n]), a), getattr(mods[n], a)) for n, a in keys]
    plain_ws = [getattr(plain_mods[n], a) for n, a in keys]
    return model, pen, plain, plain_pen, sharded, plain_ws


def _ours(pen, sharded):
    def step():
        for W in sharded:
            W.grad = None
        pen().backward()
    return step


def _naive(plain_pen, sharded, plain_ws):
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    boxes = [tuple(slice(o, o + n) for n, o in zip(*compute_local_shape_and_global_offset(
        W.shape, W.device_mesh, W.placements))) for W in sharded]

    def step():
        with torch.no_grad():
            for W, P in zip(sharded, plain_ws):
                P.copy_(W.full_tensor())
                P.grad = None
        plain_pen().backward()
        for W, P, box in zip(sharded, plain_ws, boxes):  # the gradient's local shard, as FSDP2/TP keep it
            W.grad = None
            _ = P.grad[box]
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


def _worker(rank, world, out_dir, repeats, models):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    rows = []
    try:
        for label in models:
            make, how = MODELS[label]
            model, pen, plain, plain_pen, sharded, plain_ws = _setup(make, how)
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
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows = []
    for world in a.ranks:
        with tempfile.TemporaryDirectory() as d:
            mp.spawn(_worker, args=(world, d, a.repeats, a.models), nprocs=world, join=True)
            rows += torch.load(os.path.join(d, "rows.pt"), weights_only=False)
    for r in rows:
        line = (f"{r['model']:11s} {r['ranks']} ranks: payload/rank ours {r['payload_bytes_ours'] / 1e3:9.1f} kB "
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

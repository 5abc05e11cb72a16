"""SpectralPenalty on a transformers Llama under FSDP2 and tensor parallelism, CPU and gloo:

    torchrun --nproc-per-node 2 examples/llama_fsdp2_tp_cpu.py [--steps 5]

A tiny Llama built from a config (no download). On the 2 ranks of one mesh dimension:

* each decoder layer's attention is split Megatron-style: ColwiseParallel q/k/v (their
  weights Shard(0): row blocks of each map), RowwiseParallel o_proj (Shard(1): a column
  block of the map);
* each decoder layer's MLP is sharded by FSDP2 (``fully_shard``: gate/up/down Shard(0));
* the root's FSDP2 shards the rest (embeddings, norms, lm_head), ignoring the TP weights.

Every rank sees the same batch (TP needs it; FSDP2's gradient mean over identical batches is
the gradient). The penalty is built like on one process, never gathers a weight, and takes 2
all-reduces per power iteration for the whole model (the second for o_proj's column
blocks). torchtitan's 2-D composition (FSDP2 over a ``dp_shard`` mesh dimension, TP over a
``tp`` one) is described on the distributed page of the docs (2-D meshes)."""
import argparse
import json

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from transformers import LlamaConfig, LlamaForCausalLM

import specreg_fast as sf

CFG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=32)


def make_model():
    torch.manual_seed(0)                                 # the same initial weights on every rank
    return LlamaForCausalLM(CFG)


def make_penalty(model):
    # built like on one process; the embedding is no linear map, lm_head the readout (left free)
    return sf.SpectralPenalty(model, gamma=1e-2, readout="lm_head", exclude=["model.embed_tokens"])


def batches(steps):
    g = torch.Generator().manual_seed(1)                 # the same batches on every rank
    return [torch.randint(0, CFG.vocab_size, (4, 16), generator=g) for _ in range(steps)]


def train(model, penalty, steps, log=print):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step, ids in enumerate(batches(steps)):
        loss = model(ids, labels=ids).loss + penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        s = penalty.sigmas()
        log(f"step {step}: loss {loss.item():.4f} sigma_max {max(s.values()):.4f} ({len(s)} maps)")


def shard(model, mesh):
    tp_params = set()
    for layer in model.model.layers:
        parallelize_module(layer.self_attn, mesh, {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(),
                                                   "v_proj": ColwiseParallel(), "o_proj": RowwiseParallel()})
        tp_params |= set(layer.self_attn.parameters())
        fully_shard(layer.mlp, mesh=mesh)                # gate/up/down: DTensors, Shard(0)
    fully_shard(model, mesh=mesh, ignored_params=tp_params)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    steps = ap.parse_args().steps
    dist.init_process_group("gloo")
    rank0 = dist.get_rank() == 0
    model = make_model()
    shard(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    penalty = make_penalty(model)
    train(model, penalty, steps, log=print if rank0 else (lambda _: None))
    if rank0:
        print("sigmas", json.dumps(penalty.sigmas()))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

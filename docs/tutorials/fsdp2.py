# docs-launch: torchrun 2
# %% [markdown]
# # FSDP2 under torchrun
#
# With FSDP2 (`torch.distributed.fsdp.fully_shard`) each rank holds a slice of rows of every
# weight (a DTensor sharded on dim 0). The penalty works on the shards without gathering them:
# one power step is `t = W v` (each rank its rows) and `W^T t = sum_r W_r^T (W_r v)`, so one
# all-reduce of `[t | W^T t]` per power iteration carries every sharded layer, `m + n + 1`
# floats per layer instead of its `m x n` weights. The vectors `u`, `v` are identical on every
# rank, so the penalty's `state_dict` is plain replicated buffers.
#
# This page is executed at build time as `torchrun --nproc-per-node 2 docs/tutorials/fsdp2.py`
# on the CPU with the gloo backend; the output shown is rank 0's.

# %%
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import fully_shard

import specreg_fast as sf

dist.init_process_group("gloo")
rank = dist.get_rank()


def make():
    torch.manual_seed(0)  # the same initial weights on every rank
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


model = make()
reference = make()  # the same model, unsharded, on every rank: what the sharded run must match
for layer in model[::2]:
    fully_shard(layer)  # weights become DTensors, Shard(0)
fully_shard(model)
w = model[0].weight
print(f"rank {rank}: {type(w).__name__} {tuple(w.shape)}, placements {w.placements}, local {tuple(w.to_local().shape)}")

# %% [markdown]
# The penalty is constructed as on one process. The readout `model[4]` is named.

# %%
penalty = sf.SpectralPenalty(model, gamma=1e-2, readout="4")
ref_penalty = sf.SpectralPenalty(reference, gamma=1e-2, readout="4")
opt = torch.optim.SGD(model.parameters(), lr=0.1)
ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
g = torch.Generator().manual_seed(1)
for step in range(5):
    x, y = torch.randn(16, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    loss = nn.functional.cross_entropy(model(x), y) + penalty()
    opt.zero_grad()
    loss.backward()
    opt.step()
    ref_loss = nn.functional.cross_entropy(reference(x), y) + ref_penalty()
    ref_opt.zero_grad()
    ref_loss.backward()
    ref_opt.step()
    print(f"step {step}: sharded loss {loss.item():.6f}  single-process loss {ref_loss.item():.6f}")
print("sharded:       ", {k: round(v, 5) for k, v in penalty.sigmas().items()})
print("single process:", {k: round(v, 5) for k, v in ref_penalty.sigmas().items()})
gap = max((a.full_tensor() - b).abs().max().item()
          for a, b in zip(model.parameters(), reference.parameters()))
print(f"largest weight difference after 5 steps: {gap:.2e}")

# %% [markdown]
# Both ranks fed the same batch here, so the sharded run is the single-process run: same losses,
# same sigmas, same weights up to rounding. The collectives of one penalty step, counted:

# %%
from torch.distributed.tensor.debug import CommDebugMode

with CommDebugMode() as comm:
    penalty().backward()
print({str(op): n for op, n in comm.get_comm_counts().items()})
dist.destroy_process_group()

# %% [markdown]
# One all-reduce for all the sharded layers together, and no all-gather. What is refused, with
# an error naming the layer: placements other than `Shard(d)` on one mesh dimension or
# `Replicate`, sharded `ConvTranspose` weights, conv shards that split a group,
# `conv_norm="fft"` on sharded convs, and `extra=`, LoRA, parametrized or patch-conv maps.
# Column-sharded maps (`RowwiseParallel`, a transformers `Conv1D` under FSDP2) take a second
# all-reduce per power iteration; attention q/k/v row blocks ride in the first. See
# [Distributed training](../distributed.md) and the measured payloads in
# [Benchmarks](../benchmarks.md#distributed).

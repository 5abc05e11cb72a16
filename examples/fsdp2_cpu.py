"""SpectralPenalty on an FSDP2-sharded MLP, CPU and gloo:

    torchrun --nproc-per-node 2 examples/fsdp2_cpu.py

Each rank holds half the rows of every weight; the penalty never gathers them (one
all-reduce of the power-iteration vectors per step)."""
import torch, torch.distributed as dist, torch.nn as nn
from torch.distributed.fsdp import fully_shard
import specreg_fast as sf

dist.init_process_group("gloo")
torch.manual_seed(0)                                    # the same initial weights on every rank
model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
for layer in model[::2]:
    fully_shard(layer)                                  # weights become DTensors, Shard(0)
fully_shard(model)
penalty = sf.SpectralPenalty(model, gamma=1e-2)         # constructed like on one process
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(5):
    x, y = torch.randn(16, 32), torch.randint(0, 10, (16,))
    loss = nn.functional.cross_entropy(model(x), y) + penalty()
    opt.zero_grad(); loss.backward(); opt.step()
    if dist.get_rank() == 0:
        print(f"step {step}: loss {loss.item():.4f} sigmas {penalty.sigmas()}")
dist.destroy_process_group()

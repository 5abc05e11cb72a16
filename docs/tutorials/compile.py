# %% [markdown]
# # torch.compile
#
# The penalty's ops are registered custom ops with fake (meta) implementations and a registered
# backward, so `torch.compile(..., fullgraph=True)` traces a training step that contains
# `penalty()` as one graph. The penalty's state (persistent vectors, the layer list, each conv's
# input size) cannot be created inside a compiled graph: it is created at the end of the first
# eager forward of the model, so one eager forward before the compiled step is all it takes
# (or `penalty.prepare(example_input)`: one no-grad forward with every module in eval mode, so
# no BatchNorm statistics move).

# %%
import time

import torch
import torch.nn as nn

import specreg_fast as sf


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10))


g = torch.Generator().manual_seed(0)
batches = [(torch.randn(32, 1, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(6)]

# %% [markdown]
# The compiled run: one eager forward (here the first batch, without grad), then the whole step
# (forward, loss with the penalty) under `torch.compile(fullgraph=True)`, no `prepare()`. The schedule (`start_step`, `every`) is a mask inside
# the graph, so a step with the penalty off does not recompile.

# %%
model = make()
penalty = sf.SpectralPenalty(model, gamma=1e-2, readout="7", every=2)
with torch.no_grad():
    model(batches[0][0])  # the penalty's state is created at the end of this forward
opt = torch.optim.SGD(model.parameters(), lr=0.05)


@torch.compile(fullgraph=True)
def loss_fn(x, y):
    return nn.functional.cross_entropy(model(x), y) + penalty()


compiled = []
for step, (x, y) in enumerate(batches):
    t0 = time.perf_counter()
    loss = loss_fn(x, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    compiled.append(loss.item())
    print(f"step {step}: loss {loss.item():.6f}  ({time.perf_counter() - t0:.2f} s{', compiling' if step == 0 else ''})")

# %% [markdown]
# The same steps in eager mode, from the same weights and seeds:

# %%
model_e = make()
penalty_e = sf.SpectralPenalty(model_e, gamma=1e-2, readout="7", every=2)
opt_e = torch.optim.SGD(model_e.parameters(), lr=0.05)
for step, (x, y) in enumerate(batches):
    loss = nn.functional.cross_entropy(model_e(x), y) + penalty_e()
    opt_e.zero_grad()
    loss.backward()
    opt_e.step()
    print(f"step {step}: eager loss {loss.item():.6f}  compiled - eager {compiled[step] - loss.item():+.1e}")
print("sigmas, compiled:", {k: round(v, 5) for k, v in penalty.sigmas().items()})
print("sigmas, eager:   ", {k: round(v, 5) for k, v in penalty_e.sigmas().items()})

# %% [markdown]
# The losses agree to float32 rounding (the compiled graph fuses the model's own ops
# differently; with `backend="aot_eager"` the tests find the penalty's vectors and values bit
# for bit equal to eager's). When the model's first forward is itself inside the compiled
# step (no eager forward before it), `fullgraph=True` stops at the first call with an error that
# asks for `penalty.prepare(example_input)`; without `fullgraph` the state is created at a graph
# break on the first call.

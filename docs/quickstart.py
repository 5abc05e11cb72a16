# %% [markdown]
# # Quickstart
#
# Add the penalty `gamma * sum_l sigma_max(W_l)^2` over a model's hidden layers to the loss.
# Everything else is an ordinary training loop (this page is executed when the docs are built).

# %%
import torch, torch.nn as nn
import specreg_fast as sf

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
penalty = sf.SpectralPenalty(model, gamma=1e-2, readout="4")  # hidden layers; the readout "4" is left free
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(256, 20), torch.randint(0, 3, (256,))
for step in range(50):
    loss = nn.functional.cross_entropy(model(x), y) + penalty()
    opt.zero_grad(); loss.backward(); opt.step()
print({name: round(s, 3) for name, s in penalty.sigmas().items()})
exact = {n: torch.linalg.matrix_norm(model[int(n)].weight, ord=2).item() for n in penalty.sigmas()}
print("exact:", {n: round(s, 3) for n, s in exact.items()})

# %% [markdown]
# The printed `sigmas()` are the power-iteration estimates of the penalized layers after the last
# step; `exact` is their SVD. The cheaper route writes the penalty's gradient straight into `.grad`
# after the backward: `loss.backward(); penalty.accumulate_grad(); opt.step()`
# (see [Concepts](concepts.md#penalty-vs-accumulate_grad)).

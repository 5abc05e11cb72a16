# %% [markdown]
# # LoRA with peft
#
# A LoRA adapter changes a weight `W` into `W + s B A`. `SpectralPenalty` regularizes the map the
# adapted layer applies, `sigma_max(W + s B A)`, without ever building that matrix: the power
# step applies `W v + s B (A v)` and its adjoint, and the gradient reaches `A` and `B` as
# low-rank terms. The base weights are frozen, so they take part in the warm start and are then
# held (a frozen map's term is a constant of the loss).
#
# A tiny randomly initialized BERT (no download: `BertConfig` with small sizes) with LoRA on
# its query and value projections:

# %%
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

import specreg_fast as sf

torch.manual_seed(0)
config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=64, num_labels=2)
base = BertForSequenceClassification(config)
model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                        modules_to_save=["classifier"]))
model.print_trainable_parameters()

# %% [markdown]
# The penalty on every supported layer except the classifier head (the readout). The
# embeddings are not linear maps it knows, and one warning lists them.

# %%
penalty = sf.SpectralPenalty(model, gamma=1e-2, readout="base_model.model.classifier")
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
ids = torch.randint(0, 100, (8, 16))
labels = torch.randint(0, 2, (8,))
for step in range(5):
    out = model(input_ids=ids, labels=labels)
    loss = out.loss + penalty()
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"step {step}: task loss {out.loss.item():.4f}  penalty {(loss - out.loss).item():.5f}")

# %% [markdown]
# The LoRA maps are named after the LoRA module (not `base_layer`, `lora_A`, `lora_B` apart).
# Their estimates (evaluated at the current weights: `sigmas()` holds those of the last call,
# before the last optimizer step) against the norm of the materialized `W + s B A`:

# %%
penalty.eval()  # evaluate at the current weights and vectors, no power step
with torch.no_grad():
    penalty()
sig = penalty.sigmas()
lora = [n for n in sig if n.endswith(("query", "value"))]
for name in lora[:4]:
    layer = model.get_submodule(name)
    s = layer.scaling["default"]
    W = layer.base_layer.weight + s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    exact = torch.linalg.matrix_norm(W.detach(), ord=2).item()
    print(f"{name.removeprefix('base_model.model.')}: estimate {sig[name]:.4f}  exact {exact:.4f}")
print("gradient reached the base weights:", any(model.get_submodule(n).base_layer.weight.grad is not None
                                                for n in lora))

# %% [markdown]
# Only the adapters (and the saved classifier) train; the penalty's gradient goes to `A` and `B`
# and never to the frozen base weight. After `merge_and_unload()` the same penalty setup sees
# plain `nn.Linear` layers with the merged weights.

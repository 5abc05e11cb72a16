# docs-requires: specreg_fast.integrations.transformers
# %% [markdown]
# # Fine-tuning a Hugging Face transformer with the Trainer
#
# `specreg_fast.integrations.transformers.SpectralPenaltyCallback(**penalty_kwargs)` puts the
# penalty into a `transformers.Trainer` run: it builds a `SpectralPenalty` on the trainer's model
# with the keyword arguments it was given and adds the penalty's gradient once per optimizer
# step, whatever `gradient_accumulation_steps` is, before gradient clipping (so it is clipped
# together with the loss's gradient, as if the penalty were in the loss), scaled correctly under
# fp16 and bf16. `spectral/penalty` and the per-layer sigmas reach the Trainer's `log_history`
# (and the TensorBoard/W&B callbacks) at `logging_steps`.
#
# No model hub: a tiny GPT-2 built from a `GPT2Config` with random weights, trained on random
# token sequences (`pip install specreg_fast[transformers]`).

# %%
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from specreg_fast.integrations.transformers import SpectralPenaltyCallback

torch.manual_seed(0)
config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
model = GPT2LMHeadModel(config)


class RandomTokens(torch.utils.data.Dataset):
    """Random token sequences: a language-modelling set that needs no download."""

    def __init__(self, n=64, length=16, seed=0):
        self.ids = torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


# %% [markdown]
# The penalty's arguments go to the callback. The readout `lm_head` (tied to the token
# embedding) is named, so it is left free without a warning. Gradient accumulation and clipping
# are on: the callback handles both. `log_sigmas="summary"` logs the largest and mean sigma
# beside `spectral/penalty` (the default, `"all"`, adds every map's sigma). With
# `disable_tqdm=True` the Trainer prints each log through its own `PrinterCallback`, a
# reporting callback that runs before ours: the `spectral/` keys reach it too.

# %%
args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                         max_steps=10, learning_rate=1e-3, max_grad_norm=1.0, logging_steps=2, use_cpu=True,
                         report_to=[], save_strategy="no", disable_tqdm=True, seed=0)
trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(),
                  callbacks=[SpectralPenaltyCallback(gamma=1e-2, readout="lm_head", log_sigmas="summary")])
trainer.train()

# %% [markdown]
# What reached `trainer.state.log_history`, every `logging_steps` optimizer steps:

# %%
for entry in trainer.state.log_history:
    spectral = {k: round(v, 4) for k, v in entry.items() if k.startswith("spectral/")}
    if spectral:
        print(f"step {entry['step']}: loss {entry.get('loss')}", spectral)

# %% [markdown]
# For a training loop of your own, or another trainer, `penalty.attach(optimizer)` adds the
# gradient before every `optimizer.step()` through an optimizer step pre-hook (after any
# clipping and after `scaler.unscale_`), and `penalty.stats()` gives a dict for loggers; see
# the [API reference](../api/integrations.md).

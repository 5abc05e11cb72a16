"""specreg_fast.integrations.transformers: the callback under the Hugging Face Trainer against a
hand-written loop that adds the penalty with ``accumulate_grad()`` after the backward (tiny
random GPT-2, no hub)."""
import contextlib

import pytest
import torch

import specreg_fast as sf

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from torch.utils.data import SequentialSampler  # noqa: E402

from specreg_fast.integrations.transformers import SpectralPenaltyCallback  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:SpectralPenalty. not regularized")  # the embeddings

STEPS, GA, BS, SEQ = 10, 2, 4, 8
GAMMA, LR, MAX_NORM = 0.05, 0.1, 0.5
READOUT = "lm_head"


def make_model():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=48, n_positions=SEQ, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def make_data():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 48, (STEPS * GA * BS, SEQ), generator=g)
    return [{"input_ids": x, "labels": x} for x in ids]


class SequentialTrainer(Trainer):
    """The data in order, so that the reference loop sees the same micro-batches."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


class Recorder(TrainerCallback):
    """Stands for a reporting integration (TensorBoard, W&B): listed before the user's callbacks,
    it keeps what its on_log receives."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def run_trainer(tmp_path, precision="fp32", logging_steps=5, **penalty_kwargs):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=BS,
                             gradient_accumulation_steps=GA, max_grad_norm=MAX_NORM, logging_steps=logging_steps,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             fp16=precision == "fp16", bf16=precision == "bf16")
    rec, cb = Recorder(), SpectralPenaltyCallback(gamma=GAMMA, readout=READOUT, **penalty_kwargs)
    trainer = SequentialTrainer(model=model, args=args, train_dataset=make_data(), optimizers=(opt, sched),
                                callbacks=[rec, cb])
    if precision == "fp16":
        # on a CPU the Trainer creates no GradScaler: give accelerate one, as it makes on a GPU
        # (its optimizer wrapper takes it at prepare(), backward scales the loss, clipping unscales)
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
        trainer.accelerator.native_amp = True
    trainer.train()
    return model, trainer, rec, cb


def run_reference(precision="fp32", **penalty_kwargs):
    """The same training written out: each micro-batch's backward, then the penalty's gradient
    once (times the loss scale under fp16), unscale, clip, step. The loss is the Trainer's for a
    model that takes loss kwargs: the token losses of the accumulated batch summed over
    ``num_items_in_batch``, its number of labels (counted before the causal shift)."""
    model = make_model()
    model.train()
    pen = sf.SpectralPenalty(model, gamma=GAMMA, readout=READOUT, **penalty_kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu") if precision == "fp16" else None
    amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    data = make_data()
    n_items = torch.tensor(GA * BS * SEQ)
    values, norms = [], []
    for s in range(STEPS):
        opt.zero_grad(set_to_none=True)
        for m in range(GA):
            rows = data[(s * GA + m) * BS:(s * GA + m + 1) * BS]
            ids = torch.stack([r["input_ids"] for r in rows])
            ctx = torch.autocast("cpu", dtype=amp) if amp is not None else contextlib.nullcontext()
            with ctx:
                loss = model(input_ids=ids, labels=ids, num_items_in_batch=n_items).loss
            (scaler.scale(loss) if scaler is not None else loss).backward()
        values.append(float(pen.accumulate_grad(scale=scaler.get_scale() if scaler is not None else 1.0)))
        if scaler is not None:
            scaler.unscale_(opt)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
    return model, pen, values, norms


def assert_same_weights(a, b, atol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")


def assert_logged(trainer, rec, cb, values, logging_steps, log_sigmas="all"):
    names = cb.penalty.layer_names
    keys = {"spectral/penalty", "spectral/sigma_max", "spectral/sigma_mean"}
    if log_sigmas == "all":
        keys |= {f"spectral/sigma/{n}" for n in names}
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in train_logs] == list(range(logging_steps, STEPS + 1, logging_steps))
    received = [r for r in rec.logs if "loss" in r]
    assert len(received) == len(train_logs)
    for h, r in zip(train_logs, received):
        for where in (h, r):  # the log history and what a reporting callback received
            assert {k for k in where if k.startswith("spectral/")} == keys, sorted(keys ^ set(where))
            # the penalty of the last penalized step up to the logged one, as the reference loop's
            # accumulate_grad() returned it (a step the schedule skips returns 0 and changes nothing)
            last_value = [v for v in values[:h["step"]] if v != 0][-1]
            assert where["spectral/penalty"] == pytest.approx(last_value, rel=1e-4)
    last = train_logs[-1]
    sig = cb.penalty.sigmas()
    assert last["spectral/sigma_max"] == pytest.approx(max(sig.values()), rel=1e-6)
    if log_sigmas == "all":
        assert [last[f"spectral/sigma/{n}"] for n in names] == pytest.approx([sig[n] for n in names], rel=1e-6)


def test_trainer_matches_reference_loop(tmp_path):
    model, trainer, rec, cb = run_trainer(tmp_path)
    ref, pen, values, norms = run_reference()
    assert max(norms) > MAX_NORM  # the clip acts: a gradient added after it would differ
    assert all(v > 0 for v in values)
    assert_same_weights(model, ref, 1e-5)
    assert_logged(trainer, rec, cb, values, 5)
    # the penalty's vectors are the reference's: same steps on the same weights
    for k, v in pen.state_dict().items():
        if k.split("_")[0] in ("u", "v"):
            torch.testing.assert_close(cb.penalty.state_dict()[k], v, rtol=0, atol=1e-5)


def test_trainer_fp16_with_grad_scaler(tmp_path):
    model, trainer, rec, cb = run_trainer(tmp_path, precision="fp16", logging_steps=2)
    ref, pen, values, norms = run_reference(precision="fp16")
    scaler = trainer.accelerator.scaler
    assert scaler.get_scale() == 2.0 ** 16 and not trainer.accelerator.optimizer_step_was_skipped  # no step skipped
    assert max(norms) > MAX_NORM
    assert_same_weights(model, ref, 1e-5)
    assert_logged(trainer, rec, cb, values, 2)


def test_trainer_bf16_use_cpu_with_schedule(tmp_path):
    """bf16 autocast (no scaler), with a schedule that counts optimizer steps: penalized steps
    1, 4, 7 (0-based); the max/mean summary only."""
    schedule = {"start_step": 1, "every": 3}
    model, trainer, rec, cb = run_trainer(tmp_path, precision="bf16", logging_steps=5, log_sigmas="summary", **schedule)
    assert trainer.accelerator.mixed_precision == "bf16"
    ref, pen, values, norms = run_reference(precision="bf16", **schedule)
    assert [v != 0 for v in values] == [s >= 1 and (s - 1) % 3 == 0 for s in range(STEPS)]
    assert max(norms) > MAX_NORM
    assert_same_weights(model, ref, 1e-5)
    assert_logged(trainer, rec, cb, values, 5, "summary")


def test_callback_arguments():
    with pytest.raises(TypeError, match="gamm"):
        SpectralPenaltyCallback(gamm=1e-2)
    with pytest.raises(TypeError, match="model"):
        SpectralPenaltyCallback(model=torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="auto_step"):
        SpectralPenaltyCallback(auto_step=True)
    with pytest.raises(ValueError, match="log_sigmas"):
        SpectralPenaltyCallback(log_sigmas="some")


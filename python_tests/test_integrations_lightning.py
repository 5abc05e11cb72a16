"""specreg_fast.integrations.lightning: the callback under lightning.Trainer against a
hand-written loop that adds the penalty with ``accumulate_grad()`` after the backward."""
import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import specreg_fast as sf

L = pytest.importorskip("lightning.pytorch")

from specreg_fast.integrations.lightning import SpectralPenaltyCallback  # noqa: E402

STEPS, ACC, BS = 10, 2, 8
GAMMA, LR, MAX_NORM = 0.05, 0.2, 0.5
READOUT = "fc"


def make_net():
    torch.manual_seed(0)
    return nn.ModuleDict({"net": nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 24), nn.Tanh()),
                          "fc": nn.Linear(24, 4)})


def module_class(base):
    class Module(base):
        def __init__(self):
            super().__init__()
            m = make_net()
            self.net, self.fc = m["net"], m["fc"]

        def forward(self, x):
            return self.fc(self.net(x))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        fused = False

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR, fused=self.fused or None)

    return Module


Module = module_class(L.LightningModule)


def make_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS * ACC * BS, 12, generator=g)
    y = torch.randint(0, 4, (STEPS * ACC * BS,), generator=g)
    return x, y


def recorder_class(base):
    class Recorder(base):
        """A logger that keeps what it is given (stands for TensorBoard, W&B)."""

        def __init__(self):
            super().__init__()
            self.metrics = []

        @property
        def name(self):
            return "recorder"

        @property
        def version(self):
            return 0

        def log_hyperparams(self, params, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.metrics.append((step, dict(metrics)))

    return Recorder


def run_lightning(tmp_path, precision, log_every=5, fused=False, clip=MAX_NORM, pl=L, **penalty_kwargs):
    module = Module() if pl is L else module_class(pl.LightningModule)()
    module.fused = fused
    x, y = make_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BS, shuffle=False)
    rec, cb = recorder_class(pl.loggers.Logger)(), SpectralPenaltyCallback(gamma=GAMMA, readout=READOUT, **penalty_kwargs)
    kw = dict(precision=precision)
    if precision == "16-mixed":  # Lightning turns 16-mixed into bf16-mixed on a CPU: the plugin, with a CPU GradScaler
        kw = dict(plugins=[pl.plugins.precision.MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))])
    trainer = pl.Trainer(max_steps=STEPS, accumulate_grad_batches=ACC, gradient_clip_val=clip, accelerator="cpu",
                        devices=1, logger=rec, log_every_n_steps=log_every, callbacks=[cb], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path), **kw)
    trainer.fit(module, loader)
    return module, trainer, rec, cb


def run_reference(precision, fused=False, clip=MAX_NORM, **penalty_kwargs):
    """Each batch's loss / ACC, backward (scaled under 16-mixed), then the penalty's gradient once
    (times the scale), unscale, clip, step."""
    module = Module()
    module.train()
    pen = sf.SpectralPenalty(module, gamma=GAMMA, readout=READOUT, **penalty_kwargs)
    opt = torch.optim.SGD(module.parameters(), lr=LR, fused=fused or None)
    amp = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(precision)
    scaler = torch.amp.GradScaler("cpu") if precision == "16-mixed" else None
    x, y = make_data()
    values, norms = [], []
    for s in range(STEPS):
        opt.zero_grad(set_to_none=True)
        for m in range(ACC):
            i = (s * ACC + m) * BS
            with torch.autocast("cpu", dtype=amp) if amp is not None else contextlib.nullcontext():
                loss = F.cross_entropy(module(x[i:i + BS]), y[i:i + BS]) / ACC
            (scaler.scale(loss) if scaler is not None else loss).backward()
        values.append(float(pen.accumulate_grad(scale=scaler.get_scale() if scaler is not None else 1.0)))
        if scaler is not None and not fused:  # a fused optimizer unscales in its step
            scaler.unscale_(opt)
        if clip is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(module.parameters(), clip)))
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
    return module, pen, values, norms


def check(module, ref, trainer, rec, cb, values, norms, log_every):
    assert trainer.global_step == STEPS
    assert max(norms) > MAX_NORM  # the clip acts
    for (name, p), q in zip(module.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")
    keys = {"spectral/penalty", "spectral/sigma_max", "spectral/sigma_mean"}
    keys |= {f"spectral/sigma/{n}" for n in cb.penalty.layer_names}
    logged = [(step, m) for step, m in rec.metrics if "spectral/penalty" in m]
    # the logger's step is the number of optimizer steps before the logged one's
    assert [step for step, _ in logged] == list(range(log_every - 1, STEPS, log_every))
    for step, m in logged:
        assert keys <= set(m), sorted(keys - set(m))
        assert m["spectral/penalty"] == pytest.approx(values[step], rel=1e-4)
    assert trainer.callback_metrics["spectral/penalty"].item() == pytest.approx(values[-1], rel=1e-4)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_lightning_matches_reference_loop(tmp_path, precision):
    module, trainer, rec, cb = run_lightning(tmp_path, precision)
    ref, pen, values, norms = run_reference(precision)
    if precision == "16-mixed":
        assert trainer.precision_plugin.scaler.get_scale() == 2.0 ** 16  # no step skipped
    check(module, ref, trainer, rec, cb, values, norms, 5)


def test_lightning_16_mixed_fused_optimizer(tmp_path):
    """A fused SGD unscales in its own step: Lightning calls on_before_optimizer_step on scaled
    gradients (and allows no clipping)."""
    module, trainer, rec, cb = run_lightning(tmp_path, "16-mixed", fused=True, clip=None)
    ref, pen, values, norms = run_reference("16-mixed", fused=True, clip=None)
    assert trainer.precision_plugin.scaler.get_scale() == 2.0 ** 16
    for (name, p), q in zip(module.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_lightning_schedule_counts_optimizer_steps(tmp_path):
    module, trainer, rec, cb = run_lightning(tmp_path, "32-true", log_every=1, start_step=2, every=3,
                                             log_sigmas="summary")
    ref, pen, values, norms = run_reference("32-true", start_step=2, every=3)
    assert [v != 0 for v in values] == [s >= 2 and (s - 2) % 3 == 0 for s in range(STEPS)]
    for (name, p), q in zip(module.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")
    last = [m for _, m in rec.metrics if "spectral/penalty" in m][-1]
    assert {k for k in last if k.startswith("spectral/")} == {"spectral/penalty", "spectral/sigma_max",
                                                               "spectral/sigma_mean"}


def test_standalone_pytorch_lightning_trainer(tmp_path):
    """lightning 2.x installs pytorch_lightning beside it; its Trainer takes only its own Callback."""
    pl = pytest.importorskip("pytorch_lightning")
    module, trainer, rec, cb = run_lightning(tmp_path, "32-true", pl=pl)
    assert isinstance(cb, pl.Callback) and isinstance(cb, L.Callback)
    ref, pen, values, norms = run_reference("32-true")
    check(module, ref, trainer, rec, cb, values, norms, 5)


def test_callback_arguments():
    with pytest.raises(TypeError, match="gamm"):
        SpectralPenaltyCallback(gamm=1e-2)
    with pytest.raises(ValueError, match="log_sigmas"):
        SpectralPenaltyCallback(log_sigmas=True)

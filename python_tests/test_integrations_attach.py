"""penalty.attach(optimizer) and penalty.stats() (specreg_fast/integrations/hooks.py) against a
hand-written loop that calls ``accumulate_grad()``, and the integrations' import contract."""
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import specreg_fast as sf

STEPS, ACC, BS = 6, 2, 5
GAMMA, LR, MAX_NORM = 0.05, 0.2, 0.5


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 6 * 6, 16), nn.Tanh(),
                         nn.Linear(16, 3))


def make_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS * ACC * BS, 2, 6, 6, generator=g), torch.randint(0, 3, (STEPS * ACC * BS,), generator=g)


def train(use_attach, fp16=False, remove_after=None):
    """ACC micro-batches per step, clip, step; the penalty through attach() or written out:
    accumulate_grad() after the unscale and the clip, just before the step (where attach's
    hook runs). ``remove_after``: the handle is removed after that many steps (the reference
    stops adding then)."""
    model = make_model()
    pen = sf.SpectralPenalty(model, gamma=GAMMA, readout="5")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu") if fp16 else None
    handle = pen.attach(opt) if use_attach else None
    x, y = make_data()
    values, norms = [], []
    for s in range(STEPS):
        if s == remove_after and handle is not None:
            handle.remove()
        opt.zero_grad()
        for m in range(ACC):
            i = (s * ACC + m) * BS
            with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
                loss = F.cross_entropy(model(x[i:i + BS]), y[i:i + BS]) / ACC
            (scaler.scale(loss) if fp16 else loss).backward()
        if fp16:
            scaler.unscale_(opt)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        if not use_attach and (remove_after is None or s < remove_after):
            values.append(float(pen.accumulate_grad()))
        if fp16:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if use_attach:
            values.append(pen.stats()["penalty"])
    return model, pen, values, norms


def assert_same(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16_scaler"])
def test_attach_matches_reference_loop(fp16):
    model, pen, values, norms = train(True, fp16)
    ref, ref_pen, ref_values, ref_norms = train(False, fp16)
    assert max(norms) > MAX_NORM
    assert_same(model, ref)
    assert values == pytest.approx(ref_values, rel=1e-5)
    assert int(pen.step_count) == STEPS  # one schedule step per optimizer step, not per micro-batch
    # without the penalty the weights differ (the test can tell)
    plain = make_model()
    assert not torch.allclose(plain[0].weight, model[0].weight, atol=1e-3)


def test_attach_handle_removes():
    model, pen, values, norms = train(True, remove_after=3)
    ref, *_ = train(False, remove_after=3)
    assert_same(model, ref)
    assert int(pen.step_count) == 3


def test_stats():
    model = make_model()
    pen = sf.SpectralPenalty(model, gamma={"0": 0.1, "3": 0.02}, readout="5")
    assert pen.stats() == {}  # no call yet: the layers are not chosen
    x, y = make_data()
    F.cross_entropy(model(x[:BS]), y[:BS]).backward()
    value = float(pen.accumulate_grad())
    st = pen.stats()
    sig = pen.sigmas()
    assert set(st) == {"penalty", "sigma_max", "sigma_mean", "sigma/0", "sigma/3"}
    assert st["sigma/0"] == sig["0"] and st["sigma/3"] == sig["3"]
    assert st["sigma_max"] == max(sig.values())
    assert st["sigma_mean"] == pytest.approx((sig["0"] + sig["3"]) / 2, rel=1e-12)
    assert st["penalty"] == pytest.approx(0.1 * sig["0"] ** 2 + 0.02 * sig["3"] ** 2, rel=1e-6)
    assert st["penalty"] == pytest.approx(value, rel=1e-6)
    assert set(pen.stats("summary")) == {"penalty", "sigma_max", "sigma_mean"}
    assert set(pen.stats("none")) == {"penalty"}
    with pytest.raises(ValueError, match="sigmas"):
        pen.stats("max")


def test_attach_bad_input():
    pen = sf.SpectralPenalty(make_model(), readout="5")
    with pytest.raises(TypeError, match="optimizer"):
        pen.attach(object())
    with pytest.raises(ValueError, match="eig_ub"):
        sf.SpectralPenalty(make_model(), readout="5", eig_ub=True).attach(torch.optim.SGD(make_model().parameters()))


def test_import_needs_no_framework():
    code = ("import sys, specreg_fast; i = specreg_fast.integrations; "
            "assert callable(i.attach) and callable(i.stats); "
            "print(sorted(m for m in ('transformers', 'lightning', 'pytorch_lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

"""The penalty's cost on real models (``specreg-fast bench --models``, ``bench/bench_models.py``).

Per model (torchvision with random weights and 10 classes, ``image_size`` x ``image_size``
images, 64 by default; a tiny randomly initialized HF GPT-2 on 32-token sequences), timed
interleaved over ``rounds`` rounds (at least 15 for a verdict; no downloads), gamma 1e-4, the
default ``n_iter=1`` and ``every=1``:

  * **the unpenalized training step** (batch 32, SGD, forward + backward + step);
  * **the penalty's own cost per step** (one power step per map, gradients added into the
    existing ``.grad``): ``accumulate_grad()``, ``penalty()`` + backward, and the plain-PyTorch
    reference loop (:class:`~specreg_fast.benchmarks.suite.ReferencePenalty`: per map one power
    step under no_grad, sigma by autograd through u^T W v or <y, conv(x)>, on exactly the maps
    the penalty regularizes);
  * ``accumulate_grad()`` with ``every=k`` (``--every``, default 4) as its own row: the mean
    cost per step of a schedule that steps the maps every k-th call; a cost/accuracy trade-off,
    not a substitute for the ``every=1`` rows.

Reported per penalty arm: the **share of the step**, ``median(arm) / median(step)``, with a
seeded 95% bootstrap interval (rounds resampled, the same rounds of both:
:func:`~specreg_fast.benchmarks.timing.bootstrap_ratio_interval`); the verdict is "below 5%" or
"above 5%" only where the whole interval is, else "unresolved (lo-hi)". And the **ratio to the
reference loop** (goal: <= 0.5x).

**The floor**: with ``accumulate_grad()`` a conv map costs three single-image convolutions
(forward, adjoint, weight gradient: each reads its input vector and the weight and writes its
output) plus the ``.grad`` update (read and write); a dense map costs one read of W and the
``.grad`` update (a LoRA map: one read of W; its factors' gradients are small; a frozen map:
nothing, as its sigma is held after the warm start). ``floor_bytes`` sums these per model;
``floor_s = floor_bytes / read bandwidth`` (:func:`~specreg_fast.benchmarks.timing.read_bandwidth`,
measured once per run) and the accumulate_grad row's ``x_floor`` is its median over ``floor_s``.

``vit_b_16-lora`` (only with ``peft`` installed): ViT-B/16 with LoRA (r=8) on its 24 MLP
Linears and the base frozen: the LoRA maps take the low-rank step, the reference builds
W + sBA per map. ``gpt2-tiny`` needs ``transformers``.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .suite import ReferencePenalty, penalized_model
from .timing import bootstrap_ratio_interval, fmt_time, interleaved, machine, read_bandwidth, verdict

__all__ = ["MODELS", "run", "print_table"]

#: rounds below which a share gets no verdict (reported "unresolved" whatever its interval)
MIN_ROUNDS = 15
GAMMA = 1e-4


def _tv(name: str, sized: bool = False) -> Callable[[int], nn.Module]:
    def make(image_size: int):
        import torchvision.models as tvm

        kw = {"image_size": image_size} if sized else {}
        return getattr(tvm, name)(num_classes=10, **kw)
    return make


def _vit_lora(image_size: int) -> nn.Module:
    import peft

    model = _tv("vit_b_16", sized=True)(image_size)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["mlp.0", "mlp.3"])
    model = peft.get_peft_model(model, cfg)
    with torch.no_grad():  # lora_B starts at zero: make the adapters do something
        for n, q in model.named_parameters():
            if "lora_B" in n:
                q.normal_(0, 0.02)
    return model


class _GPT2Classifier(nn.Module):
    """A tiny randomly initialized HF GPT-2 (2 layers, width 128) classifying token sequences
    into 10 classes (``GPT2ForSequenceClassification``), returning the logits tensor."""

    def __init__(self):
        super().__init__()
        from transformers import GPT2Config, GPT2ForSequenceClassification

        cfg = GPT2Config(vocab_size=1000, n_positions=64, n_embd=128, n_layer=2, n_head=4, num_labels=10,
                         pad_token_id=0)
        self.gpt = GPT2ForSequenceClassification(cfg)

    def forward(self, ids):
        return self.gpt(input_ids=ids).logits


GPT2_SEQ = 32


def _gpt2(image_size: int) -> nn.Module:
    return _GPT2Classifier()


#: name -> (builder(image_size), readout module name)
MODELS: Dict[str, tuple] = {
    "resnet50": (_tv("resnet50"), "fc"),
    "vit_b_16": (_tv("vit_b_16", sized=True), "heads.head"),
    "convnext_tiny": (_tv("convnext_tiny"), "classifier.2"),
    "efficientnet_b0": (_tv("efficientnet_b0"), "classifier.1"),
    "mobilenet_v3_small": (_tv("mobilenet_v3_small"), "classifier.3"),
    "regnet_x_400mf": (_tv("regnet_x_400mf"), "fc"),
    "densenet121": (_tv("densenet121"), "classifier"),
    "swin_t": (_tv("swin_t"), "head"),
    "resnext50_32x4d": (_tv("resnext50_32x4d"), "fc"),
    "gpt2-tiny": (_gpt2, "gpt.score"),
    "vit_b_16-lora": (_vit_lora, "base_model.model.heads.head"),
}
QUICK = ("resnet50", "convnext_tiny")


def available(names: Sequence[str]) -> List[str]:
    """``names`` minus the ones whose optional dependency is missing (peft for the LoRA row,
    transformers for GPT-2)."""
    out = []
    for n in names:
        if n not in MODELS:
            raise ValueError(f"unknown model {n!r}; expected some of {', '.join(MODELS)}")
        try:
            if n.endswith("-lora"):
                import peft  # noqa: F401
            if n.startswith("gpt2"):
                import transformers  # noqa: F401
        except ImportError:
            continue
        out.append(n)
    return out


def _inputs(name: str, batch: int, image_size: int, device: str) -> torch.Tensor:
    if name.startswith("gpt2"):
        return torch.randint(1, 1000, (batch, GPT2_SEQ), device=device)
    return torch.randn(batch, 3, image_size, image_size, device=device)


def _frozen(mp) -> bool:
    """No parameter of the map requires grad (for a LoRA map: neither the base nor a factor)."""
    if mp.lowrank is not None:
        f = mp.factors()
        return not any(t.requires_grad for t in (f.base, *f.Bs, *f.As))
    q = mp.param()
    return q is not None and not q.requires_grad


def floor_bytes(refpen: ReferencePenalty) -> int:
    """Bytes an ``accumulate_grad()`` call must move at the least (see the module docstring);
    frozen maps move none (their sigma is held after the warm start)."""
    from .. import reference as ref

    total = 0
    for mp in refpen.dense:
        if _frozen(mp):  # sigma cannot change: no power step after the warm start, no gradient
            continue
        w = mp.like()
        total += w.numel() * w.element_size() * (1 if mp.lowrank is not None else 3)
    for mp, spec in refpen.convs:
        if _frozen(mp):
            continue
        w = spec.weight
        with torch.no_grad():
            y = ref.conv_apply(spec, torch.zeros(1, *spec.input_shape, dtype=w.dtype, device=w.device))
        nx, ny, nw = int(torch.Size(spec.input_shape).numel()), y.numel(), w.numel()
        total += w.element_size() * (3 * nx + 3 * ny + 3 * nw + 2 * nw)
    return total


def _step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """The unpenalized SGD step; the ``.grad`` it leaves is where the penalty arms add theirs."""
    opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=1e-3)
    crit = nn.CrossEntropyLoss()

    def step():
        loss = crit(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _model_rows(name: str, batch: int, rounds: int, every: int, image_size: int, device: str,
                bandwidth: float) -> List[dict]:
    make, readout = MODELS[name]
    torch.manual_seed(0)
    model = make(image_size).to(device)
    x = _inputs(name, batch, image_size, device)
    y = torch.randint(0, 10, (batch,), device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refpen, pen = penalized_model(model, x[:2], gamma=GAMMA, readout=readout)
        pen_k = None
        if every > 1:  # a second penalty on the same maps, its own state and schedule
            from ..penalty import SpectralPenalty

            pen_k = SpectralPenalty(model, gamma=GAMMA, readout=readout, every=every)
            with torch.no_grad():
                model(x[:2])
            pen_k.accumulate_grad()
    n_dense, n_conv = len(refpen.dense), len(refpen.convs)
    lowrank = sum(mp.lowrank is not None for mp in refpen.dense)
    kinds = f"{n_dense} dense ({lowrank} LoRA) + {n_conv} conv maps" if lowrank else \
        f"{n_dense} dense + {n_conv} conv maps"
    fb = floor_bytes(refpen)
    model.train()
    step = _step_fn(model, x, y)
    step()  # every trainable parameter has a .grad from here on
    arms = {"no penalty (step)": step, "reference": lambda: refpen().backward(),
            "ours (SpectralPenalty)": lambda: pen().backward(), "ours (accumulate_grad)": pen.accumulate_grad}
    if pen_k is not None:
        def every_k():  # k calls: one steps the maps, k - 1 are the schedule's no-ops
            for _ in range(every):
                pen_k.accumulate_grad()
        arms[f"ours (accumulate_grad, every={every})"] = every_k
    t = interleaved(arms, repeats=rounds, warmup=2, min_time=0.02)
    if pen_k is not None:  # per step
        key = f"ours (accumulate_grad, every={every})"
        t[key]["samples"] = [s / every for s in t[key]["samples"]]
        for q in ("median", "min", "max"):
            t[key][q] /= every
    base = t["no penalty (step)"]
    rows = []
    for arm, r in t.items():
        row = {"model": name, "maps": kinds, "arm": arm, "median_s": r["median"], "min_s": r["min"],
               "max_s": r["max"], "samples_s": r["samples"]}
        if arm != "no penalty (step)":
            share, lo, hi = bootstrap_ratio_interval(r["samples"], base["samples"])
            row.update(share_of_step=share, share_low=lo, share_high=hi,
                       verdict=verdict(lo, hi) if rounds >= MIN_ROUNDS else
                       f"unresolved ({100 * lo:.1f}-{100 * hi:.1f}%, {rounds} < {MIN_ROUNDS} rounds)",
                       ratio_to_reference=r["median"] / t["reference"]["median"])
        if arm == "ours (accumulate_grad)":
            row.update(floor_bytes=fb, floor_s=fb / bandwidth, x_floor=r["median"] / (fb / bandwidth))
        rows.append(row)
    return rows


def run(names: Optional[Sequence[str]] = None, batch: int = 32, rounds: int = MIN_ROUNDS, every: int = 4,
        image_size: int = 64, device: str = "cpu", progress: Optional[Callable[[str], None]] = None) -> dict:
    """Rows for each model of ``names`` (default: every model whose dependencies are here)."""
    for k, v, lo in (("batch", batch, 1), ("rounds", rounds, 2), ("every", every, 1), ("image_size", image_size, 32)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{k} must be an int >= {lo}, got {v!r}")
    names = available(list(names) if names is not None else list(MODELS))
    bw = read_bandwidth()
    rows: List[dict] = []
    for n in names:
        if progress:
            progress(n)
        rows += _model_rows(n, batch, rounds, every, image_size, device, bw)
    return {"machine": machine(), "batch": batch, "rounds": rounds, "every": every, "image_size": image_size,
            "gamma": GAMMA, "device": device, "read_bandwidth": bw, "rows": rows}


def print_table(res: dict, file=None) -> None:
    m = res["machine"]
    print(f"penalty cost per model | {m['processor']} | torch {m['torch']} | {m['threads']} threads | {m['date']} | "
          f"batch {res['batch']}, {res['image_size']}x{res['image_size']}, {res['rounds']} rounds | "
          f"read bandwidth {res['read_bandwidth'] / 1e9:.1f} GB/s", file=file)
    head = (f"{'':<4}{'arm':<38}{'median':>12}{'min-max':>27}{'vs ref':>8}  {'share of step [95% CI]':<26}"
            f"{'verdict':<44}floor")
    print(head, file=file)
    print("-" * len(head), file=file)
    last = None
    for r in res["rows"]:
        if r["model"] != last:
            print(f"{r['model']}: {r['maps']}", file=file)
            last = r["model"]
        mm = f"{fmt_time(r['min_s'])}-{fmt_time(r['max_s'])}"
        ref = f"{r['ratio_to_reference']:.2f}x" if "ratio_to_reference" in r else ""
        share = (f"{100 * r['share_of_step']:.1f}% [{100 * r['share_low']:.1f}-{100 * r['share_high']:.1f}]"
                 if "share_of_step" in r else "")
        fl = (f"{fmt_time(r['floor_s'])} ({r['floor_bytes'] / 1e6:.1f} MB), {r['x_floor']:.1f}x"
              if "floor_s" in r else "")
        print(f"{'':<4}{r['arm']:<38}{fmt_time(r['median_s']):>12}{mm:>27}{ref:>8}  {share:<26}"
              f"{r.get('verdict', ''):<44}{fl}", file=file)
    print("share of step: median(arm) / median(unpenalized step), interleaved rounds, seeded bootstrap interval over "
          "rounds;\nvs ref: median over the reference loop's (goal <= 0.5x); floor: the bytes accumulate_grad must move "
          "over the read bandwidth, and its median as a multiple of that", file=file)

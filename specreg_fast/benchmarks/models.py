"""The penalty's cost on real models (``specreg-fast bench --models``, ``bench/bench_models.py``).

Per model (torchvision, random weights, 10 classes, 64x64 images: the model zoo of the tests):

  * **penalty cost**: the penalty alone, forward and backward, gradients added into existing
    ``.grad`` (one power step per map, as in training): the plain-PyTorch reference loop
    (:class:`~specreg_fast.benchmarks.suite.ReferencePenalty`: per map one power step under
    no_grad, sigma by autograd through u^T W v or <y, conv(x)>, on exactly the maps the penalty
    regularizes), ``penalty()`` + backward, and ``accumulate_grad()``; timed interleaved,
    reported as the ratio to the reference (goal: <= 0.6x).
  * **share of a training step** (batch 32, SGD): the unpenalized step, the step with
    ``penalty()`` in the loss and the step with ``accumulate_grad()`` after the backward,
    timed interleaved; the share is the median over rounds of (arm / unpenalized) - 1
    (goal: < 5% on ResNet-50 and ViT-B with ``accumulate_grad``).

``vit_b_16-lora`` (only with ``peft`` installed): ViT-B/16 with LoRA (r=8) on its 24 MLP
Linears and the base frozen: the LoRA maps take the low-rank step, the reference builds
W + sBA per map.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .suite import penalized_model, penalty_arms, training_arms
from .timing import fmt_time, interleaved, machine, paired_overhead

__all__ = ["MODELS", "run", "print_table"]


def _tv(name: str, **kw) -> Callable[[], nn.Module]:
    def make():
        import torchvision.models as tvm

        return getattr(tvm, name)(num_classes=10, **kw)
    return make


def _vit_lora() -> nn.Module:
    import peft

    model = _tv("vit_b_16", image_size=64)()
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["mlp.0", "mlp.3"])
    model = peft.get_peft_model(model, cfg)
    with torch.no_grad():  # lora_B starts at zero: make the adapters do something
        for n, q in model.named_parameters():
            if "lora_B" in n:
                q.normal_(0, 0.02)
    return model


#: name -> (builder, readout module name)
MODELS: Dict[str, tuple] = {
    "resnet50": (_tv("resnet50"), "fc"),
    "vit_b_16": (_tv("vit_b_16", image_size=64), "heads.head"),
    "convnext_tiny": (_tv("convnext_tiny"), "classifier.2"),
    "efficientnet_b0": (_tv("efficientnet_b0"), "classifier.1"),
    "mobilenet_v3_small": (_tv("mobilenet_v3_small"), "classifier.3"),
    "vit_b_16-lora": (_vit_lora, "base_model.model.heads.head"),
}
QUICK = ("resnet50", "convnext_tiny")


def available(names: Sequence[str]) -> List[str]:
    """``names`` minus the ones whose optional dependency is missing (peft for the LoRA row)."""
    out = []
    for n in names:
        if n not in MODELS:
            raise ValueError(f"unknown model {n!r}; expected some of {', '.join(MODELS)}")
        if n.endswith("-lora"):
            try:
                import peft  # noqa: F401
            except ImportError:
                continue
        out.append(n)
    return out


def _model_rows(name: str, batch: int, repeats: int, step: bool, device: str) -> List[dict]:
    make, readout = MODELS[name]
    torch.manual_seed(0)
    model = make().to(device)
    x = torch.randn(batch, 3, 64, 64, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refpen, pen = penalized_model(model, x[:2], readout=readout)
    n_dense, n_conv = len(refpen.dense), len(refpen.convs)
    lowrank = sum(mp.lowrank is not None for mp in refpen.dense)
    kinds = f"{n_dense} dense ({lowrank} LoRA) + {n_conv} conv maps" if lowrank else \
        f"{n_dense} dense + {n_conv} conv maps"
    rows = []
    t = interleaved(penalty_arms(model, refpen, pen), repeats=3 * repeats, warmup=2)
    for arm in ("reference", "ours (SpectralPenalty)", "ours (accumulate_grad)"):
        rows.append({"model": name, "maps": kinds, "group": "penalty cost", "arm": arm, "median_s": t[arm]["median"],
                     "min_s": t[arm]["min"], "max_s": t[arm]["max"],
                     "ratio_to_reference": t[arm]["median"] / t["reference"]["median"]})
    if step:
        y = torch.randint(0, 10, (batch,), device=device)
        model.train()
        t = interleaved(training_arms(model, x, y, refpen, pen), repeats=repeats, warmup=1, min_time=0.0)
        for arm in ("no penalty", "reference", "ours (SpectralPenalty)", "ours (accumulate_grad)"):
            rows.append({"model": name, "maps": kinds, "group": f"step share (batch {batch})", "arm": arm,
                         "median_s": t[arm]["median"], "min_s": t[arm]["min"], "max_s": t[arm]["max"],
                         "share_of_step": 0.0 if arm == "no penalty" else paired_overhead(t, arm, "no penalty")})
    return rows


def run(names: Optional[Sequence[str]] = None, batch: int = 32, repeats: int = 5, step: bool = True,
        device: str = "cpu", progress: Optional[Callable[[str], None]] = None) -> dict:
    """Rows for each model of ``names`` (default: every model whose dependencies are here)."""
    if batch < 1 or repeats < 1:
        raise ValueError(f"batch and repeats must be >= 1, got batch={batch}, repeats={repeats}")
    names = available(list(names) if names is not None else list(MODELS))
    rows: List[dict] = []
    for n in names:
        if progress:
            progress(n)
        rows += _model_rows(n, batch, repeats, step, device)
    return {"machine": machine(), "batch": batch, "repeats": repeats, "device": device, "rows": rows}


def print_table(res: dict, file=None) -> None:
    m = res["machine"]
    print(f"penalty cost per model | {m['processor']} | torch {m['torch']} | {m['threads']} threads | {m['date']}",
          file=file)
    head = f"{'':<4}{'group':<22}{'arm':<24}{'median':>12}{'min-max':>26}  vs reference / share of step"
    print(head, file=file)
    print("-" * len(head), file=file)
    last = None
    for r in res["rows"]:
        if r["model"] != last:
            print(f"{r['model']}: {r['maps']}", file=file)
            last = r["model"]
        mm = f"{fmt_time(r['min_s'])}-{fmt_time(r['max_s'])}"
        extra = (f"{r['ratio_to_reference']:.2f}x" if "ratio_to_reference" in r
                 else "" if r["arm"] == "no penalty" else f"{100 * r['share_of_step']:+.1f}%")
        print(f"{'':<4}{r['group']:<22}{r['arm']:<24}{fmt_time(r['median_s']):>12}{mm:>26}  {extra}", file=file)
    print("penalty cost: forward + backward of the penalty alone (one power step per map), medians of interleaved "
          "rounds;\nshare of step: median over rounds of (step with the penalty / unpenalized step) - 1", file=file)


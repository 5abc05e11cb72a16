"""Framework-free pieces of the trainer integrations: ``attach`` (an optimizer step pre-hook),
``stats`` (a dict for loggers) and ``add_grad`` (one optimizer step's penalty gradient, as the
callbacks add it). Imports nothing beyond torch."""
from __future__ import annotations

import contextlib
from typing import Dict, Optional

import torch

__all__ = ["attach", "stats", "add_grad", "SIGMA_MODES"]

#: what ``stats(sigmas=...)`` and the callbacks' ``log_sigmas`` accept
SIGMA_MODES = ("all", "summary", "none")


def _check_penalty(penalty) -> None:
    from ..penalty import SpectralPenalty  # a function-level import: penalty.py imports this module lazily too
    if not isinstance(penalty, SpectralPenalty):
        raise TypeError(f"penalty: expected a specreg_fast.SpectralPenalty, got {type(penalty).__name__}")


@contextlib.contextmanager
def _autocast_off():
    """Autocast off on every device type where it is on: the power steps and the gradient keep
    the weights' dtype even when called inside a mixed-precision forward (a forward hook)."""
    with contextlib.ExitStack() as stack:
        for dt in ("cpu", "cuda", "xpu", "mps", "hpu"):
            try:
                on = torch.is_autocast_enabled(dt)
            except (RuntimeError, TypeError):  # a device type this build does not know
                continue
            if on:
                stack.enter_context(torch.autocast(device_type=dt, enabled=False))
        yield


def add_grad(penalty, scale: float = 1.0, step: Optional[int] = None) -> torch.Tensor:
    """One optimizer step's penalty gradient, ``scale * d/dW gamma sum sigma^2``, added into the
    weights' ``.grad`` (:meth:`SpectralPenalty.accumulate_grad` with autocast off); returns the
    penalty's value. ``step``: set the schedule counter to this optimizer step first (the
    trainer's global step), so that ``start_step``/``every`` count optimizer steps whatever the
    gradient accumulation, and follow the trainer on a resumed run."""
    if step is not None:
        penalty.step_count.fill_(int(step))
    with _autocast_off():
        return penalty.accumulate_grad(scale=float(scale))


def attach(penalty, optimizer: torch.optim.Optimizer):
    """Add ``penalty``'s gradient before every ``optimizer.step()`` (see
    :meth:`specreg_fast.SpectralPenalty.attach`); returns the hook's removable handle."""
    _check_penalty(penalty)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if penalty.eig_ub:
        raise ValueError("attach() adds the gradient with accumulate_grad(), which does not support eig_ub=True: "
                         "add penalty() to the loss instead")

    def hook(opt, args, kwargs):
        add_grad(penalty)
        return None

    return optimizer.register_step_pre_hook(hook)


@torch.no_grad()
def stats(penalty, sigmas: str = "all") -> Dict[str, float]:
    """A flat ``{name: float}`` of the penalty's state for a logger (see
    :meth:`specreg_fast.SpectralPenalty.stats`)."""
    _check_penalty(penalty)
    if sigmas not in SIGMA_MODES:
        raise ValueError(f"sigmas must be one of {SIGMA_MODES}, got {sigmas!r}")
    if not penalty._ready:  # no call yet: the layers are not chosen (the readout needs a forward)
        return {}
    sig = penalty.last_sigmas.detach().float()
    out = {"penalty": float((penalty._term_gammas(sig) * sig.pow(2)).sum())}
    if sigmas == "none" or sig.numel() == 0:
        return out
    vals = sig.tolist()
    out["sigma_max"] = max(vals)
    out["sigma_mean"] = sum(vals) / len(vals)
    if sigmas == "all":
        out.update({f"sigma/{name}": v for name, v in zip(penalty.layer_names, vals)})
    return out


def check_penalty_kwargs(kwargs: dict, log_sigmas: str) -> dict:
    """The callbacks' ``**penalty_kwargs``, checked when the callback is created (the penalty
    itself is built on the trainer's model when training begins)."""
    import inspect

    from ..penalty import SpectralPenalty
    if log_sigmas not in SIGMA_MODES:
        raise ValueError(f"log_sigmas must be one of {SIGMA_MODES}, got {log_sigmas!r}")
    if "model" in kwargs:
        raise TypeError("model: the callback builds the penalty on the trainer's model; "
                        "pass only the penalty's options")
    if "auto_step" in kwargs:
        raise TypeError("auto_step: the callback sets the schedule counter to the trainer's optimizer step itself")
    try:
        inspect.signature(SpectralPenalty).bind_partial(None, **kwargs)
    except TypeError as e:
        raise TypeError(f"penalty_kwargs: {e} (the options of specreg_fast.SpectralPenalty)") from None
    return dict(kwargs)

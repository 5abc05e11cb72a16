"""The spectral penalty in a Lightning ``Trainer``::

    from specreg_fast.integrations.lightning import SpectralPenaltyCallback
    trainer = lightning.Trainer(callbacks=[SpectralPenaltyCallback(gamma=1e-2, readout="fc")])

Needs ``lightning`` (``pip install specreg_fast[lightning]``) or the standalone
``pytorch_lightning``; the callback is an instance of both packages' ``Callback`` where both
are installed, so either ``Trainer`` takes it. Written against Lightning 2.6.
"""
from __future__ import annotations

import importlib
from typing import Optional

from ..penalty import SpectralPenalty
from .hooks import add_grad, check_penalty_kwargs

__all__ = ["SpectralPenaltyCallback"]

_bases = []
for _pkg in ("lightning.pytorch", "pytorch_lightning"):
    try:
        _bases.append(importlib.import_module(_pkg).Callback)
    except ImportError:
        pass
if not _bases:
    raise ImportError("specreg_fast.integrations.lightning needs lightning (pip install specreg_fast[lightning]) "
                      "or pytorch_lightning")
# Both packages' Callback where both are installed (lightning 2.x installs pytorch_lightning beside it): each
# Trainer accepts only its own package's Callback, and the two base classes are plain hook sets.
Callback = type("Callback", tuple(_bases), {}) if len(_bases) > 1 else _bases[0]


class SpectralPenaltyCallback(Callback):
    """Adds ``gamma * sum_l sigma_max(W_l)^2`` (:class:`specreg_fast.SpectralPenalty`) to the
    training of a ``LightningModule`` (automatic optimization), and logs it.

    Args:
        log_sigmas: what is logged beside ``spectral/penalty``: ``"all"`` (default) each map's
            ``spectral/sigma/<name>`` and ``spectral/sigma_max``/``spectral/sigma_mean``,
            ``"summary"`` only the max and mean, ``"none"`` nothing more.
        **penalty_kwargs: the options of :class:`specreg_fast.SpectralPenalty` (``gamma``,
            ``readout``, ...). ``start_step`` and ``every`` count optimizer steps
            (``trainer.global_step``), not batches.

    The penalty is built on the LightningModule when fitting begins (``self.penalty``).

    Lightning (2.6) runs, for each optimizer step, the ``accumulate_grad_batches`` backwards
    (the loss divided by their number, scaled by the GradScaler under ``16-mixed``), then
    ``scaler.unscale_``, then ``on_before_optimizer_step``, then gradient clipping
    (``gradient_clip_val``), then the step. The gradient is added in
    ``on_before_optimizer_step``: once per optimizer step, on unscaled gradients (so not
    times the scale), and before the clip, which sees the loss's and the penalty's gradient
    together, as if the penalty were in the loss. (An optimizer that unscales inside its own
    step, a fused one, is not unscaled before the hook: there the gradient is added times the
    scale.) Under ``bf16-mixed`` there is no scaler; the
    power steps run with autocast off, in the weights' dtype. The schedule counter is set to
    ``trainer.global_step`` before each step.

    The stats (:meth:`SpectralPenalty.stats`, prefixed ``spectral/``) are logged with the
    module's ``log_dict`` (``on_step=True``), so they reach every logger at the Trainer's
    ``log_every_n_steps`` and ``trainer.callback_metrics``.

    One optimizer holding the penalized weights is assumed (Lightning calls the hook once per
    optimizer step of each optimizer).
    """

    def __init__(self, log_sigmas: str = "all", **penalty_kwargs):
        self.penalty_kwargs = check_penalty_kwargs(penalty_kwargs, log_sigmas)
        self.log_sigmas = log_sigmas
        self.prefix = "spectral/"
        self.penalty: Optional[SpectralPenalty] = None
        self._module = None

    def on_fit_start(self, trainer, pl_module):
        if self.penalty is None or self._module is not pl_module:
            self.penalty = SpectralPenalty(pl_module, auto_step=False, **self.penalty_kwargs)
            self._module = pl_module

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        add_grad(self.penalty, self._scale(trainer, optimizer), trainer.global_step)
        stats = self.penalty.stats(self.log_sigmas)
        if stats:
            pl_module.log_dict({self.prefix + k: v for k, v in stats.items()}, on_step=True, on_epoch=False)

    @staticmethod
    def _scale(trainer, optimizer) -> float:
        """1, except where the gradients are still scaled in ``on_before_optimizer_step``: under a
        GradScaler with an optimizer that unscales in its own step (Lightning skips
        ``scaler.unscale_`` for those: ``_step_supports_amp_scaling``, the fused optimizers)."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return 1.0
        opt = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the torch optimizer
        return float(scaler.get_scale()) if getattr(opt, "_step_supports_amp_scaling", False) else 1.0

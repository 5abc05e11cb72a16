"""The spectral penalty in a Hugging Face ``Trainer``::

    from specreg_fast.integrations.transformers import SpectralPenaltyCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[SpectralPenaltyCallback(gamma=1e-2, readout="lm_head")])

Needs ``transformers`` (``pip install specreg_fast[transformers]``); written against the
training loop of transformers 4.57.
"""
from __future__ import annotations

import sys
import warnings
from typing import Optional

from transformers import TrainerCallback

from ..penalty import SpectralPenalty
from .hooks import add_grad, check_penalty_kwargs

__all__ = ["SpectralPenaltyCallback"]


class SpectralPenaltyCallback(TrainerCallback):
    """Adds ``gamma * sum_l sigma_max(W_l)^2`` (:class:`specreg_fast.SpectralPenalty`) to the
    training of a ``transformers.Trainer``, and logs it.

    Args:
        log_sigmas: what is logged beside ``spectral/penalty``: ``"all"`` (default) each map's
            ``spectral/sigma/<name>`` and ``spectral/sigma_max``/``spectral/sigma_mean``,
            ``"summary"`` only the max and mean, ``"none"`` nothing more.
        **penalty_kwargs: the options of :class:`specreg_fast.SpectralPenalty` (``gamma``,
            ``readout``, ``scope``, ``start_step``, ``every``, ...). ``start_step`` and ``every``
            count optimizer steps (the Trainer's ``global_step``), not micro-batches.

    When training begins the penalty is built on the Trainer's model (``self.penalty``; its
    vectors are not saved in the Trainer's checkpoints: a resumed run warm-starts them again,
    its schedule follows ``global_step``).

    How it acts, in the Trainer's loop (transformers 4.57 ``_inner_training_loop``):

    - The gradient is added once per optimizer step, at ``on_step_begin`` (before the first
      micro-batch's backward, after the previous step's ``zero_grad``), whatever
      ``gradient_accumulation_steps`` is: the loss's gradient then accumulates on top, and
      gradient clipping sees the sum, as if the penalty were in the loss. (``on_pre_optimizer_step``
      would be too late: the Trainer calls it after clipping.) The penalty's value is not in the
      logged ``loss``.
    - Under fp16 the Trainer's backward is ``scaler.scale(loss).backward()``; the gradient is
      added times the GradScaler's current scale (``optimizer.scaler.get_scale()``), so that the
      unscale before clipping brings both to true size. Under bf16 there is no scaler; the power
      steps run with autocast off, in the weights' dtype.
    - The very first step runs before the model has seen an input, and the penalty needs one
      forward to find its layers and the readout: on that step the gradient is added at the end
      of the first micro-batch's forward (a one-shot forward hook), still before its backward.
    - The schedule counter is set to ``state.global_step`` before each step.

    Logging: at every Trainer log of a training step (``logging_steps``) the stats of the last
    step (:meth:`SpectralPenalty.stats`, prefixed ``spectral/``) join the logged values. The
    Trainer copies ``logs`` into ``state.log_history`` before calling ``on_log``, and runs its
    reporting callbacks (TensorBoard, W&B, ...) before the user's, so a key added in a plain
    ``on_log`` reaches neither. This callback therefore moves itself to the front of the
    Trainer's callback list when training begins (its events then run before the reporting
    callbacks') and, in ``on_log``, adds the keys to ``logs`` and to the ``log_history`` entry
    just written.
    """

    def __init__(self, log_sigmas: str = "all", **penalty_kwargs):
        self.penalty_kwargs = check_penalty_kwargs(penalty_kwargs, log_sigmas)
        self.log_sigmas = log_sigmas
        self.prefix = "spectral/"
        self.penalty: Optional[SpectralPenalty] = None
        self._model = None
        self._first_hook = None

    # ---------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("SpectralPenaltyCallback needs the Trainer's model (on_train_begin got model=None)")
        if self.penalty is None or self._model is not model:
            self.penalty = SpectralPenalty(model, auto_step=False, **self.penalty_kwargs)
            self._model = model
        if not self._run_first():
            warnings.warn("SpectralPenaltyCallback could not find the Trainer's callback list: callbacks that run "
                          "before it (reporting integrations) will not receive the spectral/ keys",
                          RuntimeWarning, stacklevel=2)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.penalty is None:  # added to a Trainer whose training had already begun
            self.on_train_begin(args, state, control, model=model)
        scale = self._scale(optimizer)
        step = state.global_step
        if self.penalty._ready:
            add_grad(self.penalty, scale, step)
            return
        # first step: the layers are found during the first forward; add at its end (before its backward)
        if self._first_hook is not None:
            self._first_hook.remove()

        def hook(module, inputs, output):
            self._first_hook.remove()
            self._first_hook = None
            add_grad(self.penalty, scale, step)

        self._first_hook = self._model.register_forward_hook(hook)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self.penalty is None:  # eval and end-of-training logs: nothing
            return
        extra = {self.prefix + k: v for k, v in self.penalty.stats(self.log_sigmas).items()}
        if not extra:
            return
        hist = state.log_history[-1] if state.log_history else None
        logs.update(extra)
        # the entry Trainer.log appended just before on_log: {**logs, "step": global_step}
        if hist is not None and hist.get("step") == state.global_step and hist.get("loss") == logs["loss"]:
            hist.update(extra)

    def on_train_end(self, args, state, control, **kwargs):
        if self._first_hook is not None:
            self._first_hook.remove()
            self._first_hook = None

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _scale(optimizer) -> float:
        """The loss scale of this step's backward: the GradScaler that accelerate's optimizer
        wrapper holds under fp16 (its scale changes only at ``scaler.update()``, after the step)."""
        scaler = getattr(optimizer, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return 1.0
        return float(scaler.get_scale())

    def _run_first(self) -> bool:
        """Move this callback to the front of the calling CallbackHandler's list (a new list: the
        handler's loop over the old one goes on unchanged). The handler is the ``self`` of
        ``call_event``, a caller of this event."""
        f = sys._getframe(1)
        for _ in range(6):
            if f is None:
                return False
            owner = f.f_locals.get("self")
            cbs = getattr(owner, "callbacks", None)
            if isinstance(cbs, list) and any(c is self for c in cbs):
                owner.callbacks = [self] + [c for c in cbs if c is not self]
                return True
            f = f.f_back
        return False

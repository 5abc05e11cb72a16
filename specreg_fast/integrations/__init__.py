"""The penalty inside a trainer.

- :class:`specreg_fast.integrations.transformers.SpectralPenaltyCallback`: Hugging Face
  ``Trainer(..., callbacks=[SpectralPenaltyCallback(gamma=1e-2)])``.
- :class:`specreg_fast.integrations.lightning.SpectralPenaltyCallback`:
  ``lightning.Trainer(callbacks=[SpectralPenaltyCallback(gamma=1e-2)])``.
- :func:`attach` (``penalty.attach(optimizer)``) for any other loop, and :func:`stats`
  (``penalty.stats()``) for loggers.

Each callback adds the penalty's gradient once per optimizer step, whatever the gradient
accumulation, clipped with the loss's gradient as if the penalty were in the loss, and
correct under fp16 (GradScaler) and bf16. ``transformers`` and ``lightning`` are imported
only when their submodule is (``pip install specreg_fast[transformers]`` / ``[lightning]``).
"""
import importlib as _importlib

from .hooks import SIGMA_MODES, attach, stats

__all__ = ["attach", "stats", "SIGMA_MODES", "transformers", "lightning"]


def __getattr__(name):
    # the framework submodules on first access only: `import specreg_fast.integrations` needs neither framework
    if name in ("transformers", "lightning"):
        return _importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

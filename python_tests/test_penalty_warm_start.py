"""SpectralPenalty reads its ``initialized`` buffer (a host sync on a GPU) only until it is seen
set; reset() and load_state_dict() make it read again, so their warm start still happens."""
import torch
import torch.nn as nn

import specreg_fast as sf


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.GELU(), nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 5))


def _penalty(model, n_iter_init):
    pen = sf.SpectralPenalty(model, n_iter_init=n_iter_init)
    model(torch.randn(1, 20))  # the forward order: which layer is the readout
    return pen


def test_reset_after_several_calls_warm_starts_again():
    model = _model()
    pen = _penalty(model, 20)
    first = pen().detach()
    pen()
    pen()  # the buffer has been seen set
    pen.reset()
    torch.testing.assert_close(pen().detach(), first)


def test_loading_an_uninitialized_checkpoint_warm_starts_again():
    model = _model()
    src = _penalty(model, 1)
    src()
    ck = dict(src.state_dict(), initialized=torch.zeros((), dtype=torch.bool))
    used = _penalty(model, 20)
    used()
    used()  # the buffer has been seen set
    used.load_state_dict(ck)
    fresh = sf.SpectralPenalty(model, n_iter_init=20)
    fresh.load_state_dict(ck)
    torch.testing.assert_close(used().detach(), fresh().detach())

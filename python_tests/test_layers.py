"""Discovery (specreg_fast/layers.py): which maps each layer kind gives, the readout rule, and
the non-overlapping patch convs, against SVDs of the maps and of explicit conv operators."""
import math
import warnings

import pytest
import torch
import torch.nn as nn

import specreg_fast as sf
from specreg_fast import layers as L
from specreg_fast import reference as ref


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.GELU(), nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 5))


def _svd(W):
    return torch.linalg.matrix_norm(W.detach().double(), 2).item()


def _caught(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(x.message) for x in w]


def _grads(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _both_routes(model, x, **kw):
    """The penalty's gradient by autograd (penalty()) and by accumulate_grad(), from the same
    vectors (two penalties with the same seed), frozen at their vectors (n_iter=0 after init)."""
    out = []
    for route in ("autograd", "accumulate"):
        model.zero_grad(set_to_none=True)
        pen = sf.SpectralPenalty(model, n_iter=0, n_iter_init=50, **kw)
        model(x)
        if route == "autograd":
            pen().backward()
        else:
            pen.accumulate_grad()
        out.append(_grads(model))
    return pen, out[0], out[1]


def _assert_same_grads(a, b):
    assert a.keys() == b.keys()
    for n in a:
        if a[n] is None or b[n] is None:
            assert a[n] is None and b[n] is None, n
        else:
            torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6, msg=n)


# ------------------------------------------------------------------ readout (issue 15 item 2)
def test_automatic_readout_counts_excluded_layers_and_warns_naming_it():
    mlp = _mlp()
    pen, msgs = _caught(lambda: (lambda p: (mlp(torch.randn(2, 20)), p.layer_names)[1])(
        sf.SpectralPenalty(mlp, exclude=["4"])))
    assert pen == ["0", "2"]
    assert any("readout taken to be 4 (Linear)" in m for m in msgs)


def test_explicit_readout_and_errors():
    mlp = _mlp()
    pen, msgs = _caught(lambda: sf.SpectralPenalty(mlp, readout="2").layer_names)  # no forward needed
    assert pen == ["0", "4"] and not any("readout" in m for m in msgs)
    assert sf.SpectralPenalty(mlp, readout=None).layer_names == ["0", "2", "4"]
    with pytest.raises(ValueError, match="readout: no module named 'nope'"):
        sf.SpectralPenalty(mlp, readout="nope")
    with pytest.raises(ValueError, match="readout: applies to scope='hidden'"):
        sf.SpectralPenalty(mlp, scope="all", readout="4")


class CustomHead(nn.Module):
    def __init__(self, d, k):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, k))

    def forward(self, x):
        return x @ self.w


def test_custom_head_means_no_supported_readout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), CustomHead(8, 3))

    def build():
        pen = sf.SpectralPenalty(model)
        model(torch.randn(2, 6))
        return pen.layer_names

    names, msgs = _caught(build)
    assert names == ["0", "2"]  # the last Linear is hidden: the head is the readout
    assert sum("not regularized" in m and "4 (CustomHead: w)" in m for m in msgs) == 1
    assert any("4 (CustomHead), is not a layer the penalty supports" in m for m in msgs)


class AttnLast(nn.Module):
    """A Linear then an attention block whose output is the model's output: the readout is the
    attention's out_proj, which never runs its own forward."""

    def __init__(self, e=8, kdim=None, vdim=None):
        super().__init__()
        self.inp = nn.Linear(5, e)
        self.attn = nn.MultiheadAttention(e, 2, kdim=kdim, vdim=vdim, batch_first=True)

    def forward(self, x):
        h = self.inp(x)
        return self.attn(h, h, h, need_weights=False)[0]


def test_attention_out_proj_is_seen_as_the_readout():
    torch.manual_seed(0)
    model = AttnLast()
    pen = sf.SpectralPenalty(model)
    # the readout is found (and the warning given) at the end of the first forward
    names, msgs = _caught(lambda: (model(torch.randn(2, 3, 5)), pen.layer_names)[1])
    assert names == ["inp", "attn[q]", "attn[k]", "attn[v]"]
    assert any("readout taken to be attn.out_proj" in m for m in msgs)


def test_uncalled_layer_takes_its_callers_place():
    # b.q ran inside b; b.out's weight was used by b without calling it; d never ran
    starts, ends = {"": 0, "a": 1, "b": 3, "b.q": 4, "c": 7}, {"a": 2, "b.q": 5, "b": 6, "c": 8, "": 9}
    assert L.forward_order(["c", "b.out", "a", "b.q", "x.d"], starts, ends) == ["a", "b.q", "b.out", "c", "x.d"]
    assert L.forward_order(["b.out", "a"], {"a": 0}, {"a": 1}) == ["a"]


# ------------------------------------------------------------------ attention
def test_attention_maps_values_and_gradients():
    torch.manual_seed(0)
    e = 8
    model = AttnLast(e)
    x = torch.randn(2, 3, 5)
    pen, g_auto, g_acc = _both_routes(model, x, gamma=0.5, readout=None)
    assert pen.layer_names == ["inp", "attn[q]", "attn[k]", "attn[v]", "attn.out_proj"]
    W = model.attn.in_proj_weight
    want = {"attn[q]": W[:e], "attn[k]": W[e:2 * e], "attn[v]": W[2 * e:], "attn.out_proj": model.attn.out_proj.weight,
            "inp": model.inp.weight}
    pen.n_iter = 3000
    pen()
    for n, Wm in want.items():
        assert abs(pen.sigmas()[n] - _svd(Wm)) <= 1e-4 * _svd(Wm), n
    _assert_same_grads(g_auto, g_acc)
    assert g_auto["attn.in_proj_weight"].abs().sum(1).gt(0).all()  # q, k and v rows all reached
    assert g_auto["attn.in_proj_bias"] is None
    # q, k, v blocks are views of in_proj_weight, no copy
    maps = {mp.name: mp for mp in pen._layers}
    assert maps["attn[k]"].weight().data_ptr() == W[e:].data_ptr()


def test_attention_separate_projections_and_value_path_only():
    torch.manual_seed(0)
    model = AttnLast(8, kdim=6, vdim=4)
    pen = sf.SpectralPenalty(model, readout=None, n_iter=3000)
    pen()  # dense only, readout given: no forward needed
    for t in "qkv":
        W = getattr(model.attn, f"{t}_proj_weight")
        assert abs(pen.sigmas()[f"attn[{t}]"] - _svd(W)) <= 1e-4 * _svd(W), t
    pen = sf.SpectralPenalty(model, readout=None, attention="v")
    assert pen.layer_names == ["inp", "attn[v]", "attn.out_proj"]
    with pytest.raises(ValueError, match="attention must be"):
        sf.SpectralPenalty(model, attention="qk")


def test_value_path_only_gradient_leaves_the_q_and_k_rows_exactly_zero():
    """``attention="v"``: the map ``attn[v]`` is one row block of ``in_proj_weight``; its
    gradient fills the v rows (``gamma sigma^2``'s, by autograd through the SVD of the block)
    and leaves the q and k rows exactly 0, on both routes (the parameter's other rows must not
    be taken for part of the map's gradient)."""
    torch.manual_seed(0)
    e = 8
    model = AttnLast(e).double()
    W = model.attn.in_proj_weight
    for route in ("penalty", "accumulate_grad"):
        pen = sf.SpectralPenalty(model, gamma=0.5, readout=None, attention="v", n_iter=0, n_iter_init=3000)
        model(torch.randn(2, 3, 5, dtype=torch.float64))
        assert pen.layer_names == ["inp", "attn[v]", "attn.out_proj"]
        for _ in range(3):  # fresh gradient buffers each time, where leftover memory may be reused
            model.zero_grad(set_to_none=True)
            junk = torch.full_like(W, float("nan"))  # freed at once: its memory may come back
            del junk
            pen().backward() if route == "penalty" else pen.accumulate_grad()
            got = W.grad.clone()
            assert torch.equal(got[:2 * e], torch.zeros(2 * e, e, dtype=W.dtype)), route
        model.zero_grad(set_to_none=True)
        (0.5 * torch.linalg.matrix_norm(W[2 * e:], 2) ** 2).backward()
        torch.testing.assert_close(got, W.grad, rtol=1e-7, atol=1e-9, msg=route)


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D as GPT-2 defines it (weight stored (in, out))."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(x.shape[:-1] + (self.nf,))


def test_hf_conv1d_is_a_transposed_view():
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(12, 7), nn.GELU(), Conv1D(5, 12))
    pen, g_auto, g_acc = _both_routes(model, torch.randn(3, 7), readout="2")
    assert pen.layer_names == ["0"]
    (mp,) = pen._layers
    assert mp.weight().shape == (12, 7) and mp.weight().data_ptr() == model[0].weight.data_ptr()
    _assert_same_grads(g_auto, g_acc)
    assert g_auto["2.weight"] is None and g_auto["0.weight"] is not None
    pen.n_iter = 2000
    pen()
    assert abs(pen.sigmas()["0"] - _svd(model[0].weight)) <= 1e-4 * _svd(model[0].weight)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_split_fused_qkv(kind):
    torch.manual_seed(0)
    layer = nn.Linear(6, 18) if kind == "linear" else Conv1D(18, 6)
    model = nn.Sequential(layer, nn.Linear(18, 2))
    x = torch.randn(2, 6)
    pen, g_auto, g_acc = _both_routes(model, x, readout="1", split={"0": 3})
    assert pen.layer_names == ["0[q]", "0[k]", "0[v]"]
    _assert_same_grads(g_auto, g_acc)
    W = layer.weight if kind == "linear" else layer.weight.t()
    pen.n_iter = 2000
    pen()
    for i, t in enumerate("qkv"):
        assert abs(pen.sigmas()[f"0[{t}]"] - _svd(W[6 * i:6 * (i + 1)])) <= 1e-4 * _svd(W), t
    assert sf.SpectralPenalty(model, readout="1", split={"0": 3}, attention="v").layer_names == ["0[v]"]
    assert sf.SpectralPenalty(model, readout="1").layer_names == ["0"]  # fused: one map by default
    with pytest.raises(ValueError, match="does not divide"):
        sf.SpectralPenalty(model, readout="1", split={"0": 4})
    with pytest.raises(ValueError, match="split: 'nope'"):
        sf.SpectralPenalty(model, readout="1", split={"nope": 3})


@pytest.mark.parametrize("n", [2, 4, 6])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_split_into_n_blocks_names_them_by_index_in_row_order(kind, n):
    """``split={name: n}``, n != 3: ``name[0]`` ... ``name[n-1]``, block i the rows
    ``[i r, (i+1) r)`` (its SVD norm; the blocks are scaled apart so that any other order
    shows), all kept with ``attention="v"`` (q/k/v naming is for n = 3 only)."""
    torch.manual_seed(0)
    layer = nn.Linear(5, 24) if kind == "linear" else Conv1D(24, 5)
    W = layer.weight if kind == "linear" else layer.weight.t()  # (24, 5) either way: a view
    r = 24 // n
    with torch.no_grad():
        for i in range(n):
            W[i * r:(i + 1) * r] *= 2.0 ** i
    model = nn.Sequential(layer, nn.Linear(24, 2))
    names = [f"0[{i}]" for i in range(n)]
    for attention in ("qkv", "v"):
        assert sf.SpectralPenalty(model, readout="1", split={"0": n}, attention=attention).layer_names == names
    pen, g_auto, g_acc = _both_routes(model, torch.randn(2, 5), readout="1", split={"0": n})
    _assert_same_grads(g_auto, g_acc)
    pen.n_iter = 2000
    pen()
    for i in range(n):
        want = _svd(W[i * r:(i + 1) * r])
        assert abs(pen.sigmas()[f"0[{i}]"] - want) <= 1e-4 * want, i


# ------------------------------------------------------------------ unsupported and extra=
class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.randn(4, 3))
        self.b = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return x @ (self.a @ self.b)  # the linear map x -> x (a b)


def test_one_warning_lists_unsupported_layers_and_extra_adds_a_custom_map():
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(10, 4), "bil": nn.Bilinear(4, 4, 4), "rnn": nn.GRU(4, 4),
                           "custom": Custom(), "fc": nn.Linear(4, 4), "out": nn.Linear(4, 2)})
    _, msgs = _caught(lambda: sf.SpectralPenalty(model, readout="out"))
    (msg,) = msgs
    for part in ("emb (Embedding)", "bil (Bilinear)", "rnn (GRU: weight_ih_l0, weight_hh_l0)", "custom (Custom: a, b)"):
        assert part in msg, part
    custom = model["custom"]

    def fn():
        return (custom.a @ custom.b).t()  # rows: outputs

    x = torch.randn(5, 4)
    grads = []
    for route in ("autograd", "accumulate"):
        model.zero_grad(set_to_none=True)
        pen, msgs = _caught(lambda: sf.SpectralPenalty(model, readout="out", extra={"custom": fn}, n_iter=0,
                                                       n_iter_init=300))
        assert not any("custom (Custom" in m for m in msgs)
        if route == "autograd":
            pen().backward()
        else:
            pen.accumulate_grad()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        assert pen.layer_names == ["fc", "custom"]
        assert abs(pen.sigmas()["custom"] - _svd(fn())) <= 1e-4 * _svd(fn())
    _assert_same_grads(grads[0], grads[1])
    assert grads[0]["custom.a"] is not None and grads[0]["emb.weight"] is None
    with pytest.raises(TypeError, match=r"extra\['custom'\]: expected a callable"):
        sf.SpectralPenalty(model, readout="out", extra={"custom": 3})
    pen = sf.SpectralPenalty(model, readout="out", extra={"custom": lambda: custom.a[0]})
    with pytest.raises(ValueError, match=r"extra\['custom'\] must return a 2-D"):
        pen()


# ------------------------------------------------------------------ patch convs
def _max_group_norm(m):
    W = m.weight.detach().double()
    return max(_svd(b.flatten(1)) for b in W.unflatten(0, (m.groups, -1)))


# (module, input shape, patches do not overlap). Exact = svdvals of the explicit operator.
PATCH_CASES = [
    ("k2s2g4", lambda: nn.Conv2d(8, 8, 2, stride=2, groups=4), (8, 6, 6), True),
    ("k2s2g8", lambda: nn.Conv2d(8, 16, 2, stride=2, groups=8), (8, 4, 4), True),
    ("k1s2", lambda: nn.Conv2d(3, 5, 1, stride=2), (3, 7, 7), True),
    ("k2s3", lambda: nn.Conv2d(3, 4, 2, stride=3), (3, 8, 8), True),
    ("k2s2p1", lambda: nn.Conv2d(3, 4, 2, stride=2, padding=1), (3, 6, 6), True),
    ("k2d2s3", lambda: nn.Conv1d(3, 4, 2, stride=3, dilation=2), (3, 9), True),
    ("convT_k2s2", lambda: nn.ConvTranspose2d(4, 6, 2, stride=2), (4, 3, 3), True),
    ("convT_k2s2g2", lambda: nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2), (4, 3, 3), True),
    ("k2s2p1_reflect", lambda: nn.Conv2d(3, 4, 2, stride=2, padding=1, padding_mode="reflect"), (3, 6, 6), False),
    ("k2s2p1_replicate", lambda: nn.Conv2d(3, 4, 2, stride=2, padding=1, padding_mode="replicate"), (3, 6, 6), False),
    ("k2d2s2_overlap", lambda: nn.Conv1d(3, 4, 2, stride=2, dilation=2), (3, 9), False),
    ("k3s2_overlap", lambda: nn.Conv2d(3, 4, 3, stride=2, groups=1), (3, 7, 7), False),
    ("k2s2p1_no_full_patch", lambda: nn.Conv1d(3, 4, 2, stride=2, padding=1), (3, 1), False),
    # the same geometry at length 2: two patches, both cut by the padding (operator norm 0.642,
    # the reshaped kernel's 0.782); at length 1 no patch even starts inside the image
    ("k2s2p1_len2_no_full_patch", lambda: nn.Conv1d(3, 4, 2, stride=2, padding=1), (3, 2), False),
]


@pytest.mark.parametrize("case", PATCH_CASES, ids=[c[0] for c in PATCH_CASES])
def test_nonoverlapping_patch_norm_is_max_over_groups_only_when_the_condition_holds(case):
    _, make, shape, holds = case
    torch.manual_seed(0)
    m = make()
    exact = ref.conv_sigma_exact(ref.ConvSpec.from_module(m, shape)).item()
    assert L.nonoverlapping_patches(m, shape) == holds
    if holds:
        assert abs(_max_group_norm(m) - exact) <= 1e-10 * exact
    else:  # the reshaped-kernel norm is not the operator norm here
        assert abs(_max_group_norm(m) - exact) > 1e-3 * exact
    # the penalty takes the operator norm either way (dense blocks where the condition holds)
    pen = sf.SpectralPenalty(nn.Sequential(m), scope="all", n_iter=3000, input_shapes={"0": shape})
    pen()
    assert all(not mp.conv for mp in pen._layers) == holds
    assert abs(max(pen.sigmas().values()) - exact) <= 1e-4 * exact


def test_grouped_patch_conv_penalty_is_gamma_max_sigma_squared():
    torch.manual_seed(0)
    m = nn.Conv2d(8, 8, 2, stride=2, groups=4, bias=False)
    with torch.no_grad():
        m.weight[4:6] *= 3.0  # group 2 carries the max
    model = nn.Sequential(m, nn.Flatten(), nn.Linear(8 * 9, 2))
    x = torch.randn(2, 8, 6, 6)
    pen, g_auto, g_acc = _both_routes(model, x, gamma=0.5, readout="2")
    assert pen.layer_names == [f"0[g{i}]" for i in range(4)]
    _assert_same_grads(g_auto, g_acc)
    G = g_auto["0.weight"]
    assert G[4:6].abs().sum() > 0 and G[:4].abs().sum() == 0 and G[6:].abs().sum() == 0  # only the max group
    pen.n_iter = 1000
    p = pen()
    exact = ref.conv_sigma_exact(ref.ConvSpec.from_module(m, (8, 6, 6))).item()
    assert abs(p.item() - 0.5 * exact ** 2) <= 2e-4 * 0.5 * exact ** 2


def test_tied_patch_conv_groups_share_one_gamma():
    """Two groups tied at the max: the operator's term is still ``gamma * max_g sigma_g^2``
    once, its gradient split evenly between them. 1x1 groups with power-of-two weights make
    every power-step estimate exact (sigma_g = |w_g|, vectors +-1), so the tie is exact:
    sigmas (0.5, 0.5, 0.25), value 0.5 * 0.5^2, gradient 2 * 0.5 * 0.5 / 2 on each tied
    group (u v^T = sign(w) = 1), 0 on the third."""
    m = nn.Conv2d(3, 3, 1, groups=3, bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([0.5, 0.5, 0.25]).view(3, 1, 1, 1))
    model = nn.Sequential(m)
    pen, g_auto, g_acc = _both_routes(model, torch.randn(2, 3, 4, 4), gamma=0.5, readout=None)
    assert pen.layer_names == ["0[g0]", "0[g1]", "0[g2]"]
    assert list(pen.sigmas().values()) == [0.5, 0.5, 0.25]
    want = torch.tensor([0.25, 0.25, 0.0]).view(3, 1, 1, 1)
    for g in (g_auto, g_acc):
        assert torch.equal(g["0.weight"], want)
    assert pen().item() == 0.5 * 0.5 ** 2
    assert pen.accumulate_grad().item() == 0.5 * 0.5 ** 2


def test_patch_conv_view_is_not_a_copy():
    m = nn.Conv2d(8, 8, 2, stride=2, groups=4)
    (mp,) = L.discover(nn.Sequential(m))[0]
    blocks = L.patch_maps(mp, (8, 4, 4))
    assert [b.weight().data_ptr() for b in blocks] == [m.weight[2 * i].data_ptr() for i in range(4)]
    assert blocks[1].grad_view(torch.zeros_like(m.weight)) is not None
    assert blocks[1].grad_view(torch.zeros_like(m.weight).to(memory_format=torch.channels_last)) is None


def test_accumulate_grad_into_a_grad_without_a_matching_view():
    """A 2x2 stride-2 conv (patches do not overlap: a dense map on the reshaped kernel) with a
    channels_last weight and .grad: the reshape copies, so accumulate_grad adds the view's
    adjoint instead; it equals the autograd route."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 2, stride=2), nn.Flatten(), nn.Linear(6 * 4, 2))
    model[0].to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 4, 4)
    pen, g_auto, g_acc = _both_routes(model, x, readout="2")
    assert not pen._layers[0].conv
    _assert_same_grads(g_auto, g_acc)
    model.zero_grad()
    model[0].weight.grad = torch.zeros_like(model[0].weight)  # an existing channels_last .grad
    assert pen._layers[0].grad_view(model[0].weight.grad) is None
    pen.accumulate_grad()
    torch.testing.assert_close(model[0].weight.grad, g_auto["0.weight"], rtol=1e-5, atol=1e-7)


def test_a_copy_of_the_model_made_before_the_first_call_leaves_discovery_alone():
    # an AveragedModel deep-copies the model with the penalty's discovery hooks; its forward at
    # another input size (and in another order) must not reach the penalty
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    pen = sf.SpectralPenalty(model, readout="6")
    ema = torch.optim.swa_utils.AveragedModel(model)
    model(torch.randn(2, 2, 8, 8))
    ema(torch.randn(2, 2, 16, 16))
    pen()
    assert pen._input_shapes == {"0": (2, 8, 8), "2": (4, 8, 8)}
    ema(torch.randn(2, 2, 16, 16))
    pen()  # the state keeps the sizes the model itself saw


def test_parametrized_layers_are_not_taken_for_tied_weights():
    """A parametrized weight is a new tensor on every access; two such layers are two maps."""
    class Double(nn.Module):
        def forward(self, w):
            return 2.0 * w

    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(8)])
    for layer in model:
        torch.nn.utils.parametrize.register_parametrization(layer, "weight", Double())
    assert sf.SpectralPenalty(model, readout=None).layer_names == [str(i) for i in range(8)]


class _RowScale(nn.Module):
    """A custom parametrization with a parameter of its own: ``W -> diag(d) W``."""

    def __init__(self, rows):
        super().__init__()
        self.d = nn.Parameter(torch.linspace(0.5, 2.0, rows, dtype=torch.float64))

    def forward(self, W):
        return self.d[:, None] * W


def _parametrized_mlp(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    P = torch.nn.utils.parametrizations
    for layer in (model[0], model[2]):
        if kind == "weight_norm":
            P.weight_norm(layer)
        elif kind == "orthogonal_row_scale":  # distinct singular values (d) for a well-posed gradient
            P.orthogonal(layer)
            torch.nn.utils.parametrize.register_parametrization(layer, "weight", _RowScale(layer.out_features))
        else:
            torch.nn.utils.parametrize.register_parametrization(layer, "weight", _RowScale(layer.out_features))
    return model


@pytest.mark.parametrize("route", ["penalty", "accumulate_grad"])
@pytest.mark.parametrize("kind", ["weight_norm", "orthogonal_row_scale", "row_scale"])
def test_parametrized_weights_regularize_the_applied_weight(kind, route):
    """The map of a parametrized Linear is the weight it applies (``m.weight``); the gradient
    reaches the parametrization's own tensors (float64, against autograd through the SVD norm),
    on both routes, and the state survives a state_dict round trip."""
    model = _parametrized_mlp(kind)
    pen = sf.SpectralPenalty(model, gamma=0.5, scope="all", n_iter=0, n_iter_init=3000)
    model(torch.randn(2, 6, dtype=torch.float64))
    pen().backward() if route == "penalty" else pen.accumulate_grad()
    for i in ("0", "2", "4"):
        want = torch.linalg.svdvals(model.get_submodule(i).weight.detach())[0].item()
        assert abs(pen.sigmas()[i] - want) <= 1e-6 * want, i
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    sum(0.5 * torch.linalg.matrix_norm(model.get_submodule(i).weight, 2) ** 2 for i in ("0", "2", "4")).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and sum("parametrizations.weight" in n for n in got) >= 4
    scale = max(g.abs().max().item() for g in want.values())  # (the 7x9 orthogonal factor's is 0: sigma = max d)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-6 * scale, msg=n)
    pen2 = sf.SpectralPenalty(model, gamma=0.5, scope="all", n_iter=0, n_iter_init=3000)
    pen2.load_state_dict(pen.state_dict())
    assert torch.equal(pen2.eval()(), pen.eval()())


@pytest.mark.parametrize("route", ["penalty", "accumulate_grad"])
def test_parametrized_conv_operator_gradient_reaches_the_parametrization(route):
    """A weight_norm conv: sigma and gradient of its operator at the input size it sees, against
    autograd through the SVD norm of the explicit operator (the conv of every basis image)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2)).double()
    torch.nn.utils.parametrizations.weight_norm(model[0])
    pen = sf.SpectralPenalty(model, gamma=0.5, scope="all", n_iter=0, n_iter_init=3000)
    model(torch.randn(1, 2, 5, 5, dtype=torch.float64))
    pen().backward() if route == "penalty" else pen.accumulate_grad()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    total = 0.0
    for i, shape in (("0", (2, 5, 5)), ("2", (3, 5, 5))):
        m = model.get_submodule(i)
        basis = torch.eye(math.prod(shape), dtype=torch.float64).reshape(-1, *shape)
        op = m._conv_forward(basis, m.weight, None).flatten(1).t()  # column j: the conv of basis image j
        want_sigma = torch.linalg.matrix_norm(op.detach(), 2).item()
        assert abs(pen.sigmas()[i] - want_sigma) <= 1e-6 * want_sigma, i
        total = total + 0.5 * torch.linalg.matrix_norm(op, 2) ** 2
    total.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    assert {"0.parametrizations.weight.original0", "0.parametrizations.weight.original1"} <= set(got)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-9, msg=n)

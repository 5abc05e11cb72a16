"""peft LoRA layers (specreg_fast/layers.py): the penalty regularizes the map the layer applies,
W + s B A, as one map, with its gradient reaching only A and B; checked against the map
materialized from the layer's own forward (its response to the identity) and its SVD."""
import math
import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import specreg_fast as sf

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

GAMMA = 0.5


def _lora_mlp(**cfg):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 6))
    pm = get_peft_model(m, LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2", "4"], **cfg))
    _perturb(pm)
    return pm


def _perturb(model):
    """lora_B starts at zero (W + sBA = W): give it values so the delta counts."""
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.5)


def _lora_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def _applied_map(m):
    """The (out, in) matrix the layer applies, from its forward on the identity (bias removed);
    differentiable in A and B."""
    base = m.get_base_layer()
    n_in = base.weight.shape[1] if isinstance(base, nn.Linear) else base.weight.shape[0]
    eye = torch.eye(n_in, dtype=base.weight.dtype)
    zero = torch.zeros(1, n_in, dtype=base.weight.dtype)
    return (m(eye) - m(zero)).t()


def _reference(model):
    """gamma * sum sigma_max(map)^2 over the LoRA layers, by SVD of the applied maps."""
    return sum(GAMMA * torch.linalg.matrix_norm(_applied_map(m), 2) ** 2 for m in _lora_modules(model).values())


def _penalty(model, x, **kw):
    pen = sf.SpectralPenalty(model, gamma=GAMMA, scope="all", n_iter=0, n_iter_init=300, **kw)
    model(**x) if isinstance(x, dict) else model(x)
    return pen


def _trainable_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _check_sigmas(pen, model):
    mods = _lora_modules(model)
    sig = pen.sigmas()
    assert set(sig) == set(mods)  # one map per LoRA layer: no base_layer, lora_A, lora_B maps
    for n, m in mods.items():
        want = torch.linalg.svdvals(_applied_map(m).detach().double())[0].item()
        assert abs(sig[n] - want) <= 1e-3 * want, n


@pytest.mark.parametrize("route", ["penalty", "accumulate_grad"])
def test_lora_mlp_effective_maps_sigmas_and_gradients_on_a_and_b_only(route):
    model = _lora_mlp().eval()  # eval: the forward is the map (no dropout anyway)
    x = torch.randn(4, 12)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    pen = _penalty(model, x)
    if route == "penalty":
        pen().backward()
    else:
        pen.accumulate_grad()
    _check_sigmas(pen, model)
    got = _trainable_grads(model)
    model.zero_grad(set_to_none=True)
    _reference(model).backward()
    want = _trainable_grads(model)
    assert want.keys() == got.keys() and all("lora_A" in n or "lora_B" in n for n in got)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=2e-3, atol=1e-5, msg=n)
    # the frozen base weights get no gradient and an optimizer step leaves them as they were
    model.zero_grad(set_to_none=True)
    pen2 = _penalty(model, x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pen2().backward()
    opt.step()
    for n, p in model.named_parameters():
        if "base_layer" in n:
            assert p.grad is None and torch.equal(p, before[n]), n


def test_readout_is_the_last_lora_layer_not_its_parts():
    model = _lora_mlp()
    pen = sf.SpectralPenalty(model)
    with warnings.catch_warnings(record=True) as w:  # the readout is found at the end of the first forward
        warnings.simplefilter("always")
        model(torch.randn(2, 12))
        names = pen.layer_names
    assert names == ["base_model.model.0", "base_model.model.2"]
    assert any("readout taken to be base_model.model.4 " in str(x.message) for x in w)


def test_merged_disabled_and_merge_and_unload_give_the_same_map_as_the_layer_applies():
    x = torch.randn(3, 12)
    model = _lora_mlp()
    want = {n: torch.linalg.svdvals(_applied_map(m).detach().double())[0].item()
            for n, m in _lora_modules(model).items()}
    base = {n: torch.linalg.svdvals(m.get_base_layer().weight.detach().double())[0].item()
            for n, m in _lora_modules(model).items()}
    assert all(abs(want[n] - base[n]) > 1e-2 * base[n] for n in want)  # the delta matters

    def sigmas(m):
        pen = _penalty(m, x)
        pen()
        return pen.sigmas()

    with model.disable_adapter():  # the base layers alone
        got = sigmas(model)
        assert all(abs(got[n] - base[n]) <= 1e-3 * base[n] for n in base)
    model.merge_adapter()  # the delta is in the base weight now
    got = sigmas(model)
    assert all(abs(got[n] - want[n]) <= 1e-3 * want[n] for n in want)
    model.unmerge_adapter()
    plain = model.merge_and_unload()  # plain Linears named as before
    assert all(type(m) is nn.Linear for m in plain if not isinstance(m, nn.ReLU))
    got = sigmas(plain)
    assert {n.removeprefix("base_model.model.") for n in want} == set(got)
    assert all(abs(got[n.removeprefix("base_model.model.")] - want[n]) <= 1e-3 * want[n] for n in want)


def test_active_adapters_only():
    x = torch.randn(3, 12)
    model = _lora_mlp()
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=2, target_modules=["0", "2", "4"]))
    _perturb(model)
    for adapters in (["default"], ["second"], ["default", "second"]):
        model.base_model.set_adapter(adapters)
        pen = _penalty(model, x)
        pen()
        _check_sigmas(pen, model)


def test_dora_is_reported_not_regularized_and_not_split_into_its_parts():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 6))
    model = get_peft_model(m, LoraConfig(r=2, target_modules=["0"], use_dora=True))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pen = sf.SpectralPenalty(model, scope="all")
    assert pen.layer_names == ["base_model.model.2"]
    msg = " ".join(str(x.message) for x in w)
    assert "base_model.model.0 (peft.tuners.lora.layer.Linear)" in msg and "not regularized" in msg

def _check_grads_against_reference(model, n_lora_layers):
    """The penalty's gradients (already in .grad) equal autograd through the layers' own maps,
    on exactly the A and B of n_lora_layers LoRA layers."""
    got = _trainable_grads(model)
    model.zero_grad(set_to_none=True)
    _reference(model).backward()
    want = _trainable_grads(model)
    assert len(want) == 2 * n_lora_layers
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=2e-3, atol=1e-5, msg=n)



def test_lora_on_a_tiny_bert_attention_and_dense_layers():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16)
    bert = transformers.BertModel(cfg).eval()
    model = get_peft_model(bert, LoraConfig(r=2, lora_alpha=4, target_modules=["query", "key", "value", "dense"]))
    _perturb(model)
    ids = torch.randint(0, 50, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # embeddings: not regularized
        pen = _penalty(model, {"input_ids": ids})
        pen().backward()
    _check_sigmas(pen, model)
    _check_grads_against_reference(model, n_lora_layers=7)  # query, key, value, 3 dense, pooler dense


def test_lora_on_gpt2_conv1d_is_the_transposed_effective_map():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    gpt = transformers.GPT2Model(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: fan_in_fan_out set for Conv1D
        model = get_peft_model(gpt, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"],
                                               fan_in_fan_out=True))
    _perturb(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # embeddings: not regularized
        pen = _penalty(model, {"input_ids": torch.randint(0, 50, (2, 8))})
        pen().backward()
    _check_sigmas(pen, model)
    _check_grads_against_reference(model, n_lora_layers=4)  # c_attn, attn c_proj, c_fc, mlp c_proj


def test_a_dora_adapter_activated_after_construction_is_refused_by_name():
    model = _lora_mlp()
    x = torch.randn(2, 12)
    pen = _penalty(model, x)
    pen()
    model.add_adapter("dora", LoraConfig(r=2, target_modules=["0", "2", "4"], use_dora=True))
    model.base_model.set_adapter("dora")
    with pytest.raises(ValueError, match="'dora' is a LoRA variant"):
        pen()


# ----------------------------------------------------------------------------- the low-rank step
# The penalty never builds W + sBA (dense.lowrank_sigmas): checked in float64 against autograd
# through the materialized map's SVD norm, and by counting (out, in)-sized allocations.

def _lora_mlp64(adapters=("default",), **cfg):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 6)).double()
    pm = get_peft_model(m, LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2", "4"], **cfg))
    if "second" in adapters:
        pm.add_adapter("second", LoraConfig(r=2, lora_alpha=5, target_modules=["0", "2", "4"]))
        pm.base_model.set_adapter(list(adapters))  # (set_adapter makes the named adapters trainable)
    _perturb(pm)
    return pm.double()


def _tiny_gpt2_lora64():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    gpt = transformers.GPT2Model(cfg).double().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: fan_in_fan_out set for Conv1D
        model = get_peft_model(gpt, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"],
                                               fan_in_fan_out=True))
    _perturb(model)
    return model.double(), {"input_ids": torch.randint(0, 50, (2, 8))}


def _materialized_reference_grads(model):
    """d/d(params) of sum GAMMA sigma_max(W + sum_a s_a B_a A_a)^2, autograd through the SVD of
    the materialized map (the layer's own forward on the identity)."""
    model.zero_grad(set_to_none=True)
    total = sum(GAMMA * torch.linalg.matrix_norm(_applied_map(m), 2) ** 2 for m in _lora_modules(model).values())
    total.backward()
    return _trainable_grads(model)


@pytest.mark.parametrize("route", ["penalty", "accumulate_grad"])
@pytest.mark.parametrize("case", ["one_adapter", "two_adapters", "fan_in_fan_out"])
def test_lowrank_step_matches_the_materialized_map_in_float64(case, route):
    if case == "fan_in_fan_out":
        model, x = _tiny_gpt2_lora64()
    else:
        model = _lora_mlp64(("default", "second") if case == "two_adapters" else ("default",)).eval()
        x = torch.randn(4, 12, dtype=torch.float64)
    mods = _lora_modules(model)
    if case == "two_adapters":
        assert all(len(m.active_adapters) == 2 for m in mods.values())
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2's embeddings: not regularized
        pen = sf.SpectralPenalty(model, gamma=GAMMA, scope="all", n_iter=0, n_iter_init=1000)
        model(**x) if isinstance(x, dict) else model(x)
        pen().backward() if route == "penalty" else pen.accumulate_grad()
    assert set(pen.sigmas()) == set(mods)
    for n, m in mods.items():
        want = torch.linalg.svdvals(_applied_map(m).detach())[0].item()
        assert abs(pen.sigmas()[n] - want) <= 1e-6 * want, n
    got = _trainable_grads(model)
    want = _materialized_reference_grads(model)
    n_adapters = 2 if case == "two_adapters" else 1
    assert got.keys() == want.keys() and len(got) == 2 * n_adapters * len(mods)  # A and B of each adapter
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-6 * want[n].abs().max().item(), msg=n)
    for n, p in model.named_parameters():  # the frozen base weights: no gradient, unchanged
        if "base_layer" in n:
            assert p.grad is None and torch.equal(p, base[n]), n


def test_switching_the_active_adapter_switches_the_map_and_its_gradient():
    model = _lora_mlp64(("default", "second")).eval()
    x = torch.randn(2, 12, dtype=torch.float64)
    pen = sf.SpectralPenalty(model, gamma=GAMMA, scope="all", n_iter=1000, n_iter_init=1000)
    model(x)
    for active in (["second"], ["default"]):
        model.base_model.set_adapter(active)
        model.zero_grad(set_to_none=True)
        pen().backward()
        got = {n: g for n, g in _trainable_grads(model).items()}
        want = _materialized_reference_grads(model)
        assert got.keys() == want.keys() and all(f".{active[0]}." in n for n in got)
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-6 * want[n].abs().max().item(), msg=n)


def test_base_weight_that_requires_grad_gets_u_v_transposed():
    model, x = _tiny_gpt2_lora64()  # fan_in_fan_out: the base weight is stored (in, out)
    for n, p in model.named_parameters():
        p.requires_grad_("base_layer.weight" in n or "lora_" in n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pen = sf.SpectralPenalty(model, gamma=GAMMA, scope="all", n_iter=0, n_iter_init=1000)
        model(**x)
    for route in (lambda: pen().backward(), pen.accumulate_grad):
        model.zero_grad(set_to_none=True)
        route()
        got = _trainable_grads(model)
        want = _materialized_reference_grads(model)
        assert got.keys() == want.keys() and sum("base_layer" in n for n in got) == 4
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-6 * want[n].abs().max().item(), msg=n)


def test_two_calls_before_one_backward_each_keep_their_vectors():
    """penalty() twice (the vectors move in between), one backward: the sum of the gradients of
    u_k^T M v_k at each call's own vectors, by autograd through the materialized map."""
    model = _lora_mlp64().eval()
    pen = sf.SpectralPenalty(model, gamma=GAMMA, scope="all", n_iter=1, n_iter_init=1)
    model(torch.randn(2, 12, dtype=torch.float64))
    total, refs = 0.0, 0.0
    for _ in range(2):
        total = total + pen()
        vecs = {k: b.clone() for k, b in pen.named_buffers() if k[0] in "uv"}
        refs = refs + sum(GAMMA * (vecs[f"u_{i}"] @ _applied_map(m) @ vecs[f"v_{i}"]) ** 2
                          for i, m in enumerate(_lora_modules(model).values()))
    total.backward()
    got = _trainable_grads(model)
    model.zero_grad(set_to_none=True)
    refs.backward()
    want = _trainable_grads(model)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_factor_leaves_the_vectors_as_they_were(bad):
    """A NaN or inf in one layer's B: that map's sigma is NaN and its vectors stay as they
    were; the other maps step as usual."""
    model = _lora_mlp64().eval()
    pen = sf.SpectralPenalty(model, gamma=GAMMA, scope="all", n_iter=1, n_iter_init=5)
    model(torch.randn(2, 12, dtype=torch.float64))
    pen()
    before = {k: b.clone() for k, b in pen.named_buffers() if k[0] in "uv"}
    with torch.no_grad():
        model.base_model.model[2].lora_B["default"].weight[1, 0] = bad
    pen()
    got = pen.sigmas()
    assert math.isnan(got["base_model.model.2"]) and math.isfinite(got["base_model.model.0"])
    assert torch.equal(pen.u_1, before["u_1"]) and torch.equal(pen.v_1, before["v_1"])
    assert not torch.equal(pen.v_0, before["v_0"])


def test_a_factor_whose_products_overflow_rolls_the_step_back():
    """A finite B entry of 1e200 (float64): ``M v`` is finite but its norm and ``M^T M v``
    overflow, so the step's norms are inf, not NaN, and a step that only skipped NaN norms
    would keep ``u = t / inf = 0`` and ``v = inf / inf = NaN``. The step must roll back: NaN
    estimate, vectors as they were, and once the factor is finite again the map converges
    from them to the SVD norm of the layer's applied map."""
    model = _lora_mlp64().eval()
    pen = sf.SpectralPenalty(model, gamma=GAMMA, scope="all", n_iter=1, n_iter_init=5)
    model(torch.randn(2, 12, dtype=torch.float64))
    pen()
    before = {k: b.clone() for k, b in pen.named_buffers() if k[0] in "uv"}
    B = model.base_model.model[2].lora_B["default"].weight
    kept = B[1, 0].item()
    with torch.no_grad():
        B[1, 0] = 1e200
    pen()
    got = pen.sigmas()
    assert math.isnan(got["base_model.model.2"]) and math.isfinite(got["base_model.model.0"])
    assert torch.equal(pen.u_1, before["u_1"]) and torch.equal(pen.v_1, before["v_1"])
    with torch.no_grad():
        B[1, 0] = kept
    pen.n_iter = 500
    pen()
    _check_sigmas(pen, model)


class _CountAllocations(TorchDispatchMode):
    """Counts the ops that return a fresh tensor (not a view of an input) of one of ``sizes``."""

    def __init__(self, sizes):
        super().__init__()
        self.sizes, self.hits = set(sizes), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
               if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.numel() in self.sizes
                    and t.untyped_storage().data_ptr() not in ins):
                self.hits.append(str(func))
        return out


def test_the_effective_map_is_never_built():
    """No op of the penalty (first call with the warm start, backward, accumulate_grad) makes a
    new tensor the size of a LoRA layer's out x in map (the base weights are frozen)."""
    model = _lora_mlp64().eval()
    sizes = [m.get_base_layer().weight.numel() for m in _lora_modules(model).values()]
    assert sorted(sizes) == [96, 240, 320]  # no factor or vector has these sizes (r=3)
    x = torch.randn(2, 12, dtype=torch.float64)
    pen = sf.SpectralPenalty(model, gamma=GAMMA, scope="all", n_iter=2, n_iter_init=5)
    model(x)
    with _CountAllocations(sizes) as spy:
        pen().backward()
        pen.accumulate_grad()
        pen.eval()
        pen()
    assert spy.hits == []
    with _CountAllocations(sizes) as spy:  # the spy sees a materialized map (the reference's)
        sf.layers.lora_weight(model.base_model.model[0])
    assert spy.hits


def test_state_dict_round_trip_and_warm_start():
    """The LoRA maps' vectors are u_i/v_i buffers like any dense map's: a penalty loaded before
    its first call continues bit for bit where the saved one was (no second warm start)."""
    model = _lora_mlp64().eval()
    x = torch.randn(2, 12, dtype=torch.float64)
    pen = sf.SpectralPenalty(model, gamma=GAMMA, scope="all", n_iter=1, n_iter_init=5)
    model(x)
    pen()
    pen2 = sf.SpectralPenalty(model, gamma=GAMMA, scope="all", n_iter=1, n_iter_init=5)
    pen2.load_state_dict(pen.state_dict())
    assert torch.equal(pen2(update=False), pen(update=False))
    vs = {k: b.clone() for k, b in pen2.named_buffers() if k[0] == "v"}
    pen(), pen2()  # one step each (a warm start would take 5 on pen2)
    sd, sd2 = pen.state_dict(), pen2.state_dict()
    assert {k for k in sd if k[0] in "uv"} == {f"{c}_{i}" for c in "uv" for i in range(3)}
    assert [k for k in sd if isinstance(sd[k], torch.Tensor) and not torch.equal(sd[k], sd2[k])] == []
    for i, m in enumerate(_lora_modules(model).values()):  # one power step, by hand
        M = _applied_map(m).detach()
        u = M @ vs[f"v_{i}"]
        u = u / u.norm()
        torch.testing.assert_close(sd2[f"u_{i}"], u, rtol=0, atol=1e-12)
        torch.testing.assert_close(sd2[f"v_{i}"], M.t() @ u / (M.t() @ u).norm(), rtol=0, atol=1e-12)


def test_lowrank_sigmas_on_hand_made_factors_and_bad_state():
    """dense.lowrank_sigmas directly: sigma of W^T + s B A (a transposed base) vs the SVD; a
    state of the wrong shape is refused by name before any vector moves."""
    from specreg_fast import dense
    g = torch.Generator().manual_seed(0)
    W, B, A = (torch.randn(*s, dtype=torch.float64, generator=g) for s in ((5, 7), (7, 2), (2, 5)))
    M = sf.layers.LowRank(W, True, (B,), (A,), (1.5,))
    state = dense.init_power_state([M.like()], generator=g)
    sig = dense.lowrank_sigmas([M], state.us, state.vs, n_iter=500)
    want = torch.linalg.svdvals(W.t() + 1.5 * B @ A)[0]
    assert abs(sig[0] - want) <= 1e-9 * want
    u0, v0 = state.us[0].clone(), state.vs[0].clone()
    with pytest.raises(ValueError, match=r"weights\[1\]: state v must have shape \(5,\)"):
        dense.lowrank_sigmas([M, M], state.us + [u0.clone()], state.vs + [torch.zeros(4, dtype=torch.float64)])
    assert torch.equal(state.us[0], u0) and torch.equal(state.vs[0], v0)


@pytest.mark.parametrize("route", ["penalty", "accumulate_grad"])
def test_lora_and_plain_layers_in_one_model_keep_their_names(route):
    """LoRA on the middle layer only: the plain Linears take the dense op, the LoRA map the
    low-rank step; each sigma and gradient lands on its own layer."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 6)).double()
    model = get_peft_model(m, LoraConfig(r=3, lora_alpha=6, target_modules=["2"]))
    _perturb(model)
    inner = model.base_model.model
    for i in (0, 4):
        inner[i].weight.requires_grad_(True)
    pen = sf.SpectralPenalty(model, gamma=GAMMA, scope="all", n_iter=0, n_iter_init=1000)
    model(torch.randn(2, 12, dtype=torch.float64))
    pen().backward() if route == "penalty" else pen.accumulate_grad()
    maps = {"base_model.model.0": inner[0].weight, "base_model.model.2": _applied_map(inner[2]),
            "base_model.model.4": inner[4].weight}
    assert pen.layer_names == list(maps)
    for n, M in maps.items():
        want = torch.linalg.svdvals(M.detach())[0].item()
        assert abs(pen.sigmas()[n] - want) <= 1e-6 * want, n
    got = _trainable_grads(model)
    model.zero_grad(set_to_none=True)
    maps["base_model.model.2"] = _applied_map(inner[2])
    sum(GAMMA * torch.linalg.matrix_norm(M, 2) ** 2 for M in maps.values()).backward()
    want = _trainable_grads(model)
    assert got.keys() == want.keys() and len(got) == 4
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-6 * want[n].abs().max().item(), msg=n)


def test_a_deep_copy_of_model_and_penalty_regularizes_the_copy():
    """The LoRA maps read their factors from the module they hold (no closure over the
    original), so copy.deepcopy((model, penalty)) regularizes the copied layers."""
    import copy

    model = _lora_mlp64().eval()
    pen = sf.SpectralPenalty(model, gamma=GAMMA, scope="all", n_iter=1, n_iter_init=5)
    model(torch.randn(2, 12, dtype=torch.float64))
    pen()
    model2, pen2 = copy.deepcopy((model, pen))
    pen2().backward()
    assert all(p.grad is None for p in model.parameters())
    assert sorted(n for n, p in model2.named_parameters() if p.grad is not None) == sorted(_trainable_grads(model2))

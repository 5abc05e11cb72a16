"""SpectralPenalty on models nobody here wrote: torchvision CNNs and vision transformers at
64x64, and tiny Hugging Face GPT-2 / BERT configs (skipped without ``transformers``).

For each model, with random weights: the penalty's maps are exactly what the rules of
``specreg_fast/layers.py`` say (written out again here, independently: Linear -> W, HF Conv1D
-> W^T, MultiheadAttention -> q, k, v row blocks of ``in_proj_weight`` and ``out_proj``, a conv
-> its operator, through the dense path when its patches do not overlap), minus the readout;
one training step with ``penalty()`` and one with ``accumulate_grad()`` run; the penalty's
gradient reaches exactly the regularized parameters, equally on both routes; and after
convergence each regularized map's sigma is within 1e-3 of an independent reference (the SVD
of the map's matrix; power iteration on the conv itself, ``F.conv`` and its adjoint by
``torch.func.vjp``, at the input size the layer saw, in float64).

Budget: the sigma check runs power iteration to convergence on every map of a model, which on
the big models (ResNet-50: 53 convs at 64x64) takes minutes on a laptop core. The default run
checks a subset per model (``SUBSET``: one map of each kind the model has: dense patch conv,
3x3 conv, grouped/depthwise conv, attention block, fused qkv, Conv1D); ``-m slow`` checks
every map.
"""
import warnings

import pytest
import torch
import torch.nn as nn

import specreg_fast as sf

tvm = pytest.importorskip("torchvision.models")


def _tv(name, **kw):
    return lambda: getattr(tvm, name)(num_classes=10, **kw)


def _image():
    return torch.randn(2, 3, 64, 64)


def _gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg)


def _bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=100, max_position_embeddings=16)
    return transformers.BertForSequenceClassification(cfg)


def _tokens():
    return torch.randint(0, 100, (2, 8))


# name: (builder, input, expected readout, maps checked for sigma in the default run)
MODELS = {
    "resnet18": (_tv("resnet18"), _image, "fc", ["layer4.0.downsample.0", "layer3.1.conv2"]),
    "resnet50": (_tv("resnet50"), _image, "fc", ["layer3.5.conv2", "layer4.2.conv3"]),
    "resnext50_32x4d": (_tv("resnext50_32x4d"), _image, "fc", ["layer4.0.conv2"]),
    "mobilenet_v3_small": (_tv("mobilenet_v3_small"), _image, "classifier.3",
                           ["features.1.block.0.0", "features.1.block.1.fc1", "classifier.0"]),
    "efficientnet_b0": (_tv("efficientnet_b0"), _image, "classifier.1", ["features.1.0.block.0.0"]),
    "convnext_tiny": (_tv("convnext_tiny"), _image, "classifier.2",
                      ["features.0.0", "features.5.0.block.0", "features.5.0.block.3"]),
    "regnet_x_400mf": (_tv("regnet_x_400mf"), _image, "fc", ["trunk_output.block4.block4-0.f.b.0"]),
    "shufflenet_v2_x0_5": (_tv("shufflenet_v2_x0_5"), _image, "fc", ["stage2.0.branch1.0"]),
    "densenet121": (_tv("densenet121"), _image, "classifier", ["features.denseblock4.denselayer1.conv2"]),
    "vit_b_16": (_tv("vit_b_16", image_size=64), _image, "heads.head",
                 ["conv_proj", "encoder.layers.encoder_layer_0.self_attention"]),
    "swin_t": (_tv("swin_t"), _image, "head", ["features.0.0", "features.1.0.attn.qkv"]),
    "gpt2": (_gpt2, _tokens, "lm_head", ["transformer.h.0.attn.c_attn"]),
    "bert": (_bert, _tokens, "classifier", ["bert.encoder.layer.0"]),
}


def _outputs(out):
    return out.logits if hasattr(out, "logits") else out


def expected_maps(model, readout):
    """The rules, written out: map name -> (parameter name, the map's matrix, or None for a
    conv that keeps the operator path)."""
    out = {}
    attn_children = set()
    for n, m in model.named_modules():
        if n == readout or n.startswith(readout + ".") or n in attn_children:
            continue
        if isinstance(m, nn.MultiheadAttention):
            E = m.embed_dim
            for i, t in enumerate("qkv"):
                out[f"{n}[{t}]"] = (f"{n}.in_proj_weight", lambda m=m, i=i: m.in_proj_weight[i * E:(i + 1) * E])
            out[f"{n}.out_proj"] = (f"{n}.out_proj.weight", lambda m=m: m.out_proj.weight)
            attn_children.add(f"{n}.out_proj")
        elif isinstance(m, nn.Linear):
            out[n] = (f"{n}.weight", lambda m=m: m.weight)
        elif type(m).__name__ == "Conv1D":
            out[n] = (f"{n}.weight", lambda m=m: m.weight.t())
        elif isinstance(m, nn.Conv2d):
            k, s, d = m.kernel_size, m.stride, m.dilation
            patches = m.padding_mode == "zeros" and all((k[i] - 1) * d[i] + 1 <= s[i] for i in range(2))
            assert not (patches and m.groups > 1), "a grouped patch conv: blocks per group (not in this zoo)"
            out[n] = (f"{n}.weight", (lambda m=m: m.weight.flatten(1)) if patches else None)
    return out


def conv_sigma_reference(m, input_shape, n_iter):
    """Power iteration on the conv ``m`` (its own padding mode, stride, dilation, groups) at
    ``input_shape``; the adjoint by torch.func.vjp of the (linear) forward. In float32 (float64
    convs are 10-40x slower on CPU here; the float32 fixed point is within ~1e-6 of the
    float64 one, far inside the 1e-3 checked)."""
    w = m.weight.detach().float()
    x = torch.randn((1,) + tuple(input_shape), generator=torch.Generator().manual_seed(1))
    _, adjoint = torch.func.vjp(lambda z: m._conv_forward(z, w, None), x)
    sigma = 0.0
    for _ in range(n_iter):
        x = x / x.norm()
        y = m._conv_forward(x, w, None)
        (x,) = adjoint(y)
    return m._conv_forward(x.double() / x.double().norm(), w.double(), None).norm().item()


def _regularized_params(model):
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def _check_model(name, all_maps):
    build, make_input, readout, subset = MODELS[name]
    torch.manual_seed(0)
    model = build()
    x = make_input()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pen = sf.SpectralPenalty(model, gamma=1e-3)
        model(x)
        names = pen.layer_names
    assert any(f"readout taken to be {readout} (" in str(w.message) for w in caught)
    assert sf.SpectralPenalty(model, gamma=1e-3, readout=readout, input_shapes=pen._input_shapes).layer_names == names

    want = expected_maps(model, readout)
    assert sorted(names) == sorted(want)
    assert sorted(mp.name for mp in pen._convs) == sorted(n for n, (_, f) in want.items() if f is None)

    # one training step each way
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss = _outputs(model(x)).float().pow(2).mean() + pen()
    opt.zero_grad()
    loss.backward()
    opt.step()
    opt.zero_grad()
    _outputs(model(x)).float().pow(2).mean().backward()
    pen.accumulate_grad()
    opt.step()

    # the penalty's gradient reaches exactly the regularized parameters, the same on both routes
    pen.eval()
    model.zero_grad(set_to_none=True)
    pen().backward()
    by_autograd = {n: p.grad for n, p in model.named_parameters()}
    assert _regularized_params(model) == {p for p, _ in want.values()}
    model.zero_grad(set_to_none=True)
    pen.accumulate_grad()
    assert _regularized_params(model) == {p for p, _ in want.values()}
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, by_autograd[n], rtol=1e-4, atol=1e-9, msg=n)

    # sigma after convergence against the independent reference
    owners = subset if not all_maps else None
    check = pen if all_maps else sf.SpectralPenalty(model, gamma=1e-3, scope=owners, input_shapes=pen._input_shapes)
    check.train()
    check.n_iter = 800
    check()
    sig = check.sigmas()
    if not all_maps:
        assert sig and set(sig) <= set(want)
    for n, s in sig.items():
        _, matrix = want[n]
        if matrix is not None:
            exact = torch.linalg.matrix_norm(matrix().detach().double(), 2).item()
        else:
            m = model.get_submodule(n)
            exact = conv_sigma_reference(m, pen._input_shapes[n], 1500)
        assert abs(s - exact) <= 1e-3 * exact, (n, s, exact)


@pytest.mark.parametrize("name", list(MODELS))
def test_model_zoo(name):
    _check_model(name, all_maps=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_model_zoo_every_map_converges(name):
    _check_model(name, all_maps=True)

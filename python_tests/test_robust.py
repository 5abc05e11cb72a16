"""Robustness evaluation: probe, Lipschitz/Jacobian bounds vs exact answers, attacks re-verified,
and the certified Lemma 1 bound never above a measured adversarial distance."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from specreg_fast import data, robust

pytest.importorskip("torchattacks")


def _train(feat, head, x, y, steps=300, lr=1e-2, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(list(feat.parameters()) + list(head.parameters()), lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(head(feat(x)), y).backward()
        opt.step()
    return robust.ProbedClassifier(feat, head).eval()


@pytest.fixture(scope="module")
def xor_model():
    torch.manual_seed(0)
    ds = data.toy_xor(n=400, noise=0.25, seed=1)
    feat = nn.Sequential(nn.Linear(2, 16), nn.GELU(), nn.Linear(16, 12), nn.Tanh())
    model = _train(feat, nn.Linear(12, 2), ds.x_train, ds.y_train)
    assert robust.accuracy(model, ds.x_test, ds.y_test) > 0.9
    return ds, model


@pytest.fixture(scope="module")
def digits_model():
    torch.manual_seed(0)
    ds = data.sklearn_digits(flatten=True)
    feat = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
    model = _train(feat, nn.Linear(32, 10), ds.x_train, ds.y_train, steps=200)
    return ds, model


def _gelu_true_max_slope():
    # d/dt [t Phi(t)] = Phi(t) + t phi(t); its max solves t^2 = 2 (second derivative phi(t)(2 - t^2) = 0)
    t = math.sqrt(2.0)
    return 0.5 * (1 + math.erf(t / math.sqrt(2))) + t * math.exp(-t * t / 2) / math.sqrt(2 * math.pi)


def test_activation_max_slope():
    g = robust.activation_max_slope(nn.GELU())
    true = _gelu_true_max_slope()
    assert true <= g <= true * (1 + 1e-5)
    assert abs(true - 1.1289) < 1e-4
    assert robust.activation_max_slope(nn.ReLU()) == 1.0
    assert robust.activation_max_slope(nn.LeakyReLU(0.1)) == 1.0
    assert 1.0 <= robust.activation_max_slope(nn.Tanh()) <= 1 + 1e-5
    assert 0.25 <= robust.activation_max_slope(nn.Sigmoid()) <= 0.25 * (1 + 1e-5)


def test_lipschitz_bound_dominates_jacobian_and_factors():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(9)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.2, 3)
    with torch.no_grad():
        bn.weight.uniform_(-2, 2)
    feat = nn.Sequential(nn.Linear(5, 9), bn, nn.GELU(), nn.Sequential(nn.Linear(9, 7), nn.Sigmoid()),
                         nn.Dropout(0.5)).eval()
    L, factors = robust.feature_lipschitz_bound(feat, return_factors=True)
    names = [n for n, _ in factors]
    assert names == ["0", "1", "2", "3.0", "3.1", "4"]
    w0 = feat[0].weight.detach().double()
    assert factors[0][1] == pytest.approx(float(torch.linalg.svdvals(w0)[0]), rel=1e-12)
    assert factors[1][1] == pytest.approx(float((bn.weight.abs() / (bn.running_var + bn.eps).sqrt()).max()),
                                          rel=1e-6)
    assert L == pytest.approx(math.prod(f for _, f in factors))
    x = 3 * torch.randn(256, 5)
    jn = robust.feature_jacobian_norm(feat, x, method="exact")
    assert (jn <= L * (1 + 1e-5)).all()
    # a plugged-in bound is used as given
    L2 = robust.feature_lipschitz_bound(feat, layer_bound=lambda m: 2.0 if m is feat[0] else None)
    assert L2 == pytest.approx(L / factors[0][1] * 2.0)


def test_lipschitz_bound_refuses_unknown_layers():
    with pytest.raises(ValueError, match="certified norm bound"):
        robust.feature_lipschitz_bound(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))
    with pytest.raises(TypeError, match="no known Lipschitz"):
        robust.feature_lipschitz_bound(nn.Sequential(nn.Linear(2, 2), nn.Softmax(dim=1)))
    bn = nn.BatchNorm1d(2).train()
    with pytest.raises(ValueError, match="eval mode"):
        robust.feature_lipschitz_bound(nn.Sequential(nn.Linear(2, 2), bn))
    with pytest.raises(ValueError, match="layer_bound"):
        robust.feature_lipschitz_bound(nn.Sequential(nn.Linear(2, 2)), layer_bound=lambda m: float("nan"))


@pytest.mark.parametrize("shape", [(6,), (1, 5, 5)], ids=["dense", "conv"])
def test_jacobian_norm_power_matches_exact(shape):
    torch.manual_seed(1)
    if len(shape) == 1:
        feat = nn.Sequential(nn.Linear(6, 11), nn.GELU(), nn.Linear(11, 4), nn.Tanh())
    else:
        feat = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GELU(), nn.Flatten(), nn.Linear(18, 5))
    feat.eval()
    x = torch.randn(7, *shape, dtype=torch.float64)
    feat.double()
    exact = robust.feature_jacobian_norm(feat, x, method="exact")
    power = robust.feature_jacobian_norm(feat, x, method="power", n_iter=100)
    # exact via explicit per-sample jacobian from torch.autograd.functional
    for i in range(3):
        J = torch.autograd.functional.jacobian(lambda v: feat(v.unsqueeze(0)).reshape(-1), x[i])
        assert exact[i] == pytest.approx(float(torch.linalg.svdvals(J.reshape(J.shape[0], -1))[0]), rel=1e-10)
    torch.testing.assert_close(power, exact, rtol=1e-6, atol=0)


def test_probe_matches_trained_readout(digits_model):
    ds, model = digits_model
    trained = robust.accuracy(model, ds.x_test, ds.y_test)
    clf, probed = robust.probe_classifier(model.features, ds.x_train, ds.y_train, 10, ds.x_test, ds.y_test)
    assert trained > 0.85
    assert probed >= trained - 0.03
    assert clf.features is model.features and clf.readout is not model.readout
    # deterministic, and the frozen features are untouched
    before = [p.clone() for p in model.features.parameters()]
    r2 = robust.linear_probe(model.features, ds.x_train, ds.y_train, 10)
    torch.testing.assert_close(r2.weight, clf.readout.weight, rtol=0, atol=0)
    for p, q in zip(before, model.features.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="n_classes"):
        robust.linear_probe(model.features, ds.x_train, ds.y_train, 1)
    with pytest.raises(ValueError, match="labels"):
        robust.linear_probe(model.features, ds.x_train, ds.y_train, 5)


def test_transfer_probe(digits_model):
    ds, _ = digits_model
    src, tgt = data.transfer_split(ds)
    feat = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
    model = _train(feat, nn.Linear(32, 5), src.x_train, src.y_train, steps=200)
    assert robust.accuracy(model, src.x_test, src.y_test) > 0.85
    clf, acc = robust.transfer_probe(model.features, tgt)
    assert clf.readout.out_features == 5
    assert acc > 0.6  # features from digits 0-4 still separate 5-9 well above chance (0.2)


def _check_result(model, x, y, r, bounds=None, min_success=1.0):
    assert float(r.success.float().mean()) >= min_success, f"{r.method}: {r.success.tolist()}"
    xa = r.x_adv
    with torch.no_grad():
        adv_pred = model(xa).argmax(1)
    assert torch.equal(adv_pred != y[r.index], r.success)  # success means really adversarial
    d = (xa - x[r.index]).reshape(len(xa), -1).norm(dim=1)
    torch.testing.assert_close(r.distance[r.success], d[r.success])
    assert torch.isinf(r.distance[~r.success]).all()
    if bounds is not None:
        assert xa.min() >= bounds[0] - 1e-5 and xa.max() <= bounds[1] + 1e-5


def test_certified_bound_below_measured_distance_deepfool(xor_model):
    ds, model = xor_model
    r = robust.minimal_l2_distance(model, ds.x_test, ds.y_test, method="deepfool", n_points=40,
                                   bounds=ds.bounds)
    assert len(r.index) == 40 and (model(ds.x_test[r.index]).argmax(1) == ds.y_test[r.index]).all()
    # DeepFool's linearization walks some XOR points outward into saturated corners and fails there;
    # those are reported as inf, the rest must be real adversarial points
    _check_result(model, ds.x_test, ds.y_test, r, ds.bounds, min_success=0.5)
    L = robust.feature_lipschitz_bound(model.features)
    b = robust.lemma1_bounds(model.features, model.readout, ds.x_test[r.index], ds.y_test[r.index],
                             lipschitz=L)
    assert (b["certified"] > 0).all()
    assert (b["certified"] <= r.distance).all()
    assert (b["certified"] <= b["empirical"] * (1 + 1e-5)).all()  # local Jacobian norm <= global bound
    # the certificate is tight enough to mean something on this model (not a vacuous 0)
    ok = r.success
    assert float((b["certified"][ok] / r.distance[ok]).median()) > 0.01


def test_certificate_holds_under_random_and_pgd_perturbations(xor_model):
    ds, model = xor_model
    x, y = ds.x_test[:60], ds.y_test[:60]
    L = robust.feature_lipschitz_bound(model.features)
    b = robust.lemma1_bounds(model.features, model.readout, x, y, lipschitz=L)
    cert = b["certified"]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        d = torch.randn(x.shape, generator=g)
        d = d / d.norm(dim=1, keepdim=True) * (0.999 * cert[:, None])
        assert (model(x + d).argmax(1) == y)[b["correct"]].all()
    # PGD-L2 at an eps below every certified radius cannot lower accuracy on those points
    m = b["correct"]
    eps = 0.99 * float(cert[m].min())
    acc = robust.pgd_accuracy(model, x[m], y[m], [0.0, eps], norm="L2", bounds=ds.bounds, steps=30)
    assert acc[0.0] == 1.0 and acc[eps] == 1.0


def test_hopskipjump_verified_and_above_certificate(xor_model):
    pytest.importorskip("foolbox")
    ds, model = xor_model
    r = robust.minimal_l2_distance(model, ds.x_test, ds.y_test, method="hsj", n_points=8, steps=10,
                                   max_gradient_eval_steps=200, bounds=ds.bounds, batch_size=4)
    _check_result(model, ds.x_test, ds.y_test, r, ds.bounds)
    L = robust.feature_lipschitz_bound(model.features)
    cert = robust.lemma1_bounds(model.features, model.readout, ds.x_test[r.index], ds.y_test[r.index],
                                lipschitz=L)["certified"]
    assert (cert <= r.distance).all()
    df = robust.minimal_l2_distance(model, ds.x_test, ds.y_test, method="deepfool", n_points=8,
                                    bounds=ds.bounds)
    # in 2-D HopSkipJump gets close to the true minimum: never much farther than white-box DeepFool
    both = df.success
    assert both.sum() >= 3
    assert (r.distance[both] <= 1.1 * df.distance[both]).all(), (r.distance, df.distance)


def test_fab_on_images(digits_model):
    ds, model = digits_model
    r = robust.minimal_l2_distance(model, ds.x_test, ds.y_test, method="fab", n_points=4, steps=20,
                                   bounds=ds.bounds)
    _check_result(model, ds.x_test, ds.y_test, r, ds.bounds)
    L = robust.feature_lipschitz_bound(model.features)
    cert = robust.lemma1_bounds(model.features, model.readout, ds.x_test[r.index], ds.y_test[r.index],
                                lipschitz=L)["certified"]
    assert (cert <= r.distance).all()


def test_pgd_accuracy_monotone(digits_model):
    ds, model = digits_model
    x, y = ds.x_test[:100], ds.y_test[:100]
    clean = robust.accuracy(model, x, y)
    for norm, eps in (("Linf", [0.0, 0.02, 0.1, 0.3]), ("L2", [0.0, 0.3, 1.0, 3.0])):
        acc = robust.pgd_accuracy(model, x, y, eps, norm=norm, steps=10)
        vals = [acc[e] for e in eps]
        assert vals[0] == clean
        assert all(a >= b for a, b in zip(vals, vals[1:])), (norm, vals)
        assert vals[-1] < clean  # a large budget does hurt
    with pytest.raises(ValueError, match="norm"):
        robust.pgd_accuracy(model, x, y, [0.1], norm="L1")


def test_bad_arguments(xor_model):
    ds, model = xor_model
    with pytest.raises(ValueError, match="method"):
        robust.minimal_l2_distance(model, ds.x_test, ds.y_test, method="tangent")
    with pytest.raises(ValueError, match="n_points"):
        robust.minimal_l2_distance(model, ds.x_test, ds.y_test, method="deepfool", n_points=0)
    with pytest.raises(TypeError, match="int64"):
        robust.minimal_l2_distance(model, ds.x_test, ds.y_test.float())
    with pytest.raises(ValueError, match="bounds"):
        robust.minimal_l2_distance(model, ds.x_test, ds.y_test, method="deepfool", bounds=(1.0, 1.0))
    with pytest.raises(ValueError, match="lipschitz"):
        robust.lemma1_bounds(model.features, model.readout, ds.x_test, ds.y_test, lipschitz=-1.0)


@pytest.mark.slow
@pytest.mark.skipif(not robust.HAS_AUTOATTACK, reason="pyautoattack not installed")
def test_autoattack_accuracy(digits_model):
    ds, model = digits_model
    x, y = ds.x_test[:32], ds.y_test[:32]
    clean = robust.accuracy(model, x, y)
    acc = robust.autoattack_accuracy(model, x, y, 0.5, norm="L2", version="standard")
    pgd = robust.pgd_accuracy(model, x, y, [0.5], norm="L2", steps=20)[0.5]
    assert acc <= clean and acc <= pgd + 1e-9

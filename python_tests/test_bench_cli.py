"""`specreg-fast bench`: the suite runs end to end (tiny shapes), its JSON has the documented
fields, its error column is computed against exact values, and bad options fail clearly."""
import json

import pytest
import torch
import torch.nn as nn

from specreg_fast import cli
from specreg_fast.benchmarks import suite


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    rc = cli.main(["bench", "--sizes", "tiny", "--json", str(d / "b.json"), "--plot", str(d / "b.png")])
    assert rc == 0
    return d


def test_json_rows_and_machine_info(tiny):
    res = json.loads((tiny / "b.json").read_text())
    assert {"machine", "size", "device", "read_bandwidth_Bps", "rows", "gpu_roofline_estimate"} <= set(res)
    assert res["read_bandwidth_Bps"] > 1e8
    assert {"torch", "threads", "date", "processor"} <= set(res["machine"])
    groups = {r["group"] for r in res["rows"]}
    assert groups == {"dense", "conv", "circular"}
    for r in res["rows"]:
        assert r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["ratio_vs_reference"] > 0
    # every group has its reference and the baselines the suite promises
    backends = {(r["group"], r["backend"]) for r in res["rows"]}
    assert {("dense", "ours"), ("dense", "reference"), ("dense", "torch spectral_norm"),
            ("dense", "matrix_norm(ord=2)"), ("conv", "ours"), ("conv", "reference"),
            ("conv", "torch spectral_norm"), ("circular", "ours (matrix-free)"),
            ("circular", "exact eigvalsh")} <= backends
    assert "ESTIMATE" in res["gpu_roofline_estimate"]["text"]
    assert (tiny / "b.png").stat().st_size > 1000


def test_ratio_and_bandwidth_columns_from_known_timings(monkeypatch):
    """With the timer replaced by known medians (reference 6 ms, ours 2 ms, ...), the row's
    ratio is 3.0, its GB/s the bytes of W over 2 ms, and its share of the read bandwidth that
    over the given bandwidth: numbers known before the suite runs, not its own formula."""
    known = {"ours": 2e-3, "reference": 6e-3, "torch spectral_norm": 12e-3, "matrix_norm(ord=2)": 24e-3}

    def fake_interleaved(fns, repeats=15, **kw):
        for f in fns.values():  # the rows read the state the timed functions leave
            f()
        return {k: {"median": known[k], "min": known[k] / 2, "max": known[k] * 2, "samples": [known[k]]}
                for k in fns}

    monkeypatch.setattr(suite, "interleaved", fake_interleaved)
    rows = suite.dense_rows([(64, 48)], [(8, 8)], repeats=1, bw=4e9, device="cpu")
    by = {r["backend"]: r for r in rows if r["shape"] == "64x48"}
    assert by["ours"]["ratio_vs_reference"] == 3.0
    assert by["reference"]["ratio_vs_reference"] == 1.0
    assert by["torch spectral_norm"]["ratio_vs_reference"] == 0.5
    assert by["matrix_norm(ord=2)"]["ratio_vs_reference"] == 0.25
    assert (by["ours"]["min_s"], by["ours"]["max_s"]) == (1e-3, 4e-3)
    nbytes = 64 * 48 * 4  # one float32 read of W per step
    assert by["ours"]["gbps"] == pytest.approx(nbytes / 2e-3 / 1e9, rel=1e-12)  # 1.536 GB/s
    assert by["ours"]["frac_read_bw"] == pytest.approx(nbytes / 2e-3 / 4e9, rel=1e-12)  # 0.384


def _fixed_steps(n):
    """A stand-in for the timer that runs every timed function exactly n times (how far the
    iteration got must not depend on the machine's speed or load)."""
    def fake_interleaved(fns, repeats=15, **kw):
        for f in fns.values():
            for _ in range(n):
                f()
        return {k: {"median": 1e-3, "min": 1e-3, "max": 1e-3, "samples": [1e-3]} for k in fns}
    return fake_interleaved


def test_rel_err_is_against_the_exact_norm(monkeypatch):
    """The error column is real: a state far from converged (one step from a random start)
    gives a large error, a converged one (300 steps) a tiny error (exact = matrix_norm in
    float64)."""
    errs = {}
    for n in (1, 300):
        monkeypatch.setattr(suite, "interleaved", _fixed_steps(n))
        rows = suite.dense_rows([(40, 30)], [(8, 8)], repeats=3, bw=1e10, device="cpu")
        errs[n] = next(r for r in rows if r["backend"] == "ours" and r["shape"] == "40x30")["rel_err"]
        exact_row = next(r for r in rows if r["backend"] == "matrix_norm(ord=2)")
        assert exact_row["rel_err"] < 1e-5
        sn = next(r for r in rows if r["backend"] == "torch spectral_norm")
        assert sn["rel_err"] is not None and sn["gbps"] > 0 and 0 < sn["frac_read_bw"]
    assert errs[1] > 1e-2 and errs[300] < 1e-5, errs


def test_conv_spectral_norm_row_is_flagged_as_another_quantity(tiny):
    res = json.loads((tiny / "b.json").read_text())
    row = next(r for r in res["rows"] if r["group"] == "conv" and r["backend"] == "torch spectral_norm")
    assert "different quantity" in row["note"]
    # the reshaped-kernel norm of this strided layer is about 23% off its operator norm
    assert row["rel_err"] > 0.1


def test_errors(capsys):
    if not torch.cuda.is_available():
        assert cli.main(["bench", "--device", "cuda", "--sizes", "tiny"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--device", "tpu"])
    with pytest.raises(ValueError, match="size must be one of"):
        suite.run("huge")


class _EveryMapKind(torch.nn.Module):
    """A dense layer, attention (q/k/v blocks + out_proj), a 3x3 conv, a depthwise conv, a
    non-overlapping patch conv (the dense path) and a readout."""

    def __init__(self):
        super().__init__()
        self.patch = torch.nn.Conv2d(3, 8, 2, stride=2)
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        h = self.dw(self.conv(self.patch(x)))
        t = h.flatten(2).transpose(1, 2)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        return self.head(torch.relu(self.fc(t.mean(1))))


def test_reference_penalty_computes_the_same_penalty_and_gradient_as_ours():
    # the per-model bench's ratio compares like with like: after convergence the plain loop's
    # penalty and its gradient equal SpectralPenalty's on every kind of map (float64; seed 2
    # has clear gaps below every map's top singular value, so 300 steps converge the vectors)
    torch.manual_seed(2)
    model = _EveryMapKind().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    refpen, pen = suite.penalized_model(model, x, gamma=0.5, readout="head")
    assert len(refpen.dense) == 1 + 4 + 1 and len(refpen.convs) == 2  # patch, q/k/v/out, fc; conv, dw
    for _ in range(300):
        with torch.no_grad():
            refpen()
            pen()
    params = [q for q in model.parameters()]
    g_ref = torch.autograd.grad(refpen(), params, allow_unused=True)
    g_ours = torch.autograd.grad(pen(), params, allow_unused=True)
    torch.testing.assert_close(refpen(), pen().double(), rtol=1e-5, atol=0)  # (the penalty sums in float32)
    for name, a, b in zip([n for n, _ in model.named_parameters()], g_ref, g_ours):
        assert (a is None) == (b is None), name
        if a is not None:
            assert float((a - b).norm()) <= 1e-6 * float(b.norm()), name


def test_reference_penalty_builds_lora_maps_in_full():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).double()
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["0"]))
    with torch.no_grad():
        for n, q in model.named_parameters():
            if "lora_B" in n:
                q.normal_()
    refpen, pen = suite.penalized_model(model, torch.randn(2, 12, dtype=torch.float64), readout="base_model.model.2")
    assert [mp.lowrank is not None for mp in refpen.dense] == [True]
    for _ in range(300):
        with torch.no_grad():
            refpen()
    lora = model.base_model.model[0]
    W = lora.base_layer.weight + lora.scaling["default"] * lora.lora_B["default"].weight @ lora.lora_A["default"].weight
    torch.testing.assert_close(refpen(), pen.gammas[0].double() * torch.linalg.matrix_norm(W, 2) ** 2, rtol=1e-8,
                               atol=0)


def test_bench_models_cli(tmp_path, capsys):
    out = tmp_path / "m.json"
    assert cli.main(["bench", "--models", "mobilenet_v3_small", "--batch", "2", "--rounds", "2", "--every", "3",
                     "--image-size", "32", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "mobilenet_v3_small: 41 dense + 12 conv maps" in table and "share of step" in table
    res = json.loads(out.read_text())
    assert (res["batch"], res["rounds"], res["every"], res["image_size"], res["gamma"]) == (2, 2, 3, 32, 1e-4)
    assert res["read_bandwidth"] > 0
    rows = {r["arm"]: r for r in res["rows"]}
    assert list(rows) == ["no penalty (step)", "reference", "ours (SpectralPenalty)", "ours (accumulate_grad)",
                          "ours (accumulate_grad, every=3)"]
    step = rows.pop("no penalty (step)")
    assert "share_of_step" not in step and len(step["samples_s"]) == 2
    for arm, r in rows.items():
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"] and len(r["samples_s"]) == 2
        # the share is the ratio of the two medians, inside its interval; 2 rounds give no verdict
        assert r["share_of_step"] == pytest.approx(r["median_s"] / step["median_s"], rel=1e-12)
        assert r["share_low"] <= r["share_of_step"] <= r["share_high"]
        assert r["verdict"].startswith("unresolved (") and "2 < 15 rounds" in r["verdict"]
        assert r["ratio_to_reference"] == pytest.approx(r["median_s"] / rows["reference"]["median_s"], rel=1e-12)
        assert r["verdict"] in table
    acc = rows["ours (accumulate_grad)"]
    assert acc["floor_s"] == pytest.approx(acc["floor_bytes"] / res["read_bandwidth"], rel=1e-12)
    assert acc["x_floor"] == pytest.approx(acc["median_s"] / acc["floor_s"], rel=1e-12)
    assert "floor_s" not in rows["reference"]
    assert cli.main(["bench", "--models", "alexnet"]) == 2
    assert "unknown model 'alexnet'" in capsys.readouterr().err
    assert cli.main(["bench", "--models", "mobilenet_v3_small", "--rounds", "1"]) == 2
    assert "rounds must be an int >= 2" in capsys.readouterr().err


def test_floor_bytes_by_hand():
    """One Linear 5->3 (dense: one read of W, the .grad read and written) and one conv 2->4,
    3x3, padding 1 on 2x6x6 inputs (three convolutions reading input and weight and writing
    the output, then the .grad update), float32."""
    from specreg_fast.benchmarks.models import floor_bytes
    from specreg_fast.benchmarks.suite import penalized_model

    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Flatten(), nn.Linear(144, 3), nn.ReLU(),
                          nn.Linear(3, 5))
    refpen, _ = penalized_model(model, torch.randn(2, 2, 6, 6), readout="4")
    nw, nx, ny = 4 * 2 * 9, 2 * 36, 4 * 36
    assert floor_bytes(refpen) == 4 * (3 * 144 * 3) + 4 * (3 * nx + 3 * ny + 5 * nw)
    # a frozen map takes no step after the warm start and gets no gradient: it moves nothing
    model[2].weight.requires_grad_(False)
    assert floor_bytes(refpen) == 4 * (3 * nx + 3 * ny + 5 * nw)
    model[0].weight.requires_grad_(False)
    assert floor_bytes(refpen) == 0

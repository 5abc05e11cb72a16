"""A 1-epoch smoke run of every case of the reproduction, end to end (data, three arms,
probe, attacks, bounds, table, JSON, plots)."""
import json
import math
import os

import pytest

pytest.importorskip("mlxtend")
pytest.importorskip("foolbox")
pytest.importorskip("torchattacks")
pytest.importorskip("matplotlib")

import torch  # noqa: E402

from specreg_fast import experiments as E  # noqa: E402


def test_every_case_runs_and_writes_outputs(tmp_path, capsys):
    cfg = E.Config(cases=("toy-xor", "toy-sine", "mnist-mlp", "mnist-cnn", "mnist-cnn-circular", "transfer"), mlp_width=32,
                   mlp_epochs=1, cnn_epochs=1, toy_epochs=2, attack_points=3, pgd_points=6, attack_steps=1,
                   hsj_max_evals=20, pgd_eps_linf=(0.05,), attacks=("hsj", "deepfool"), whitebox_points=2, trajectory_points=4, toy_eig_ub=True,
                   pgd_eps_l2=(1.0,), burn_in=0.5, seeds=(0, 1), cnn_seeds=(0,), out_dir=str(tmp_path), progress=False)
    out = E.reproduce(cfg)
    table = capsys.readouterr().out
    for arm in E.ARMS:
        assert arm in table
    res = json.loads((tmp_path / "results.json").read_text())
    assert {r["case"] for r in res["summary"]} == set(cfg.cases)
    for f in ("robust_accuracy.png", "trajectories.png", "toy_decision_boundaries.png"):
        assert os.path.getsize(tmp_path / f) > 1000
    # the paired comparisons: rep - ll and rep - vanilla for every case and metric, Holm over all
    t = res["paired"]["t_holm"]
    assert len(t) == 2 * len(E._PAIRED_METRICS) * len(cfg.cases)
    assert all(c["p_adj"] >= c["p"] for c in t)
    assert {(b["case"], b["seed"]) for b in res["paired"]["bootstrap_min_l2"]} == {
        (c, s) for c in cfg.cases for s in E.case_seeds(c, cfg)}
    assert "paired differences" in table
    for case in cfg.cases:
        assert set(out["runs"][case]) == set(E.case_seeds(case, cfg))
        runs = out["runs"][case][0]
        # the penalized arms really regularized (their penalty ran) and vanilla did not
        assert runs["vanilla"]["penalty_time_s"] == 0
        assert runs["rep-spectral"]["penalty_time_s"] > 0 and runs["ll-spectral"]["penalty_time_s"] > 0
        for arm in E.ARMS:
            r = runs[arm]
            assert 0.0 <= r["probe_acc"] <= 1.0
            if "certified_le_measured" in r:
                assert r["certified_le_measured"]
                assert r["lemma1_points_violated"] == 0
                assert r["lemma1_points_checked"] == sum(math.isfinite(d) for d in r["points"]["upper"])
            # the step budget: the penalty ran from the end of the burn-in to the last step
            assert r["penalized_steps"] == (r["steps"] - r["start_step"] if arm != "vanilla" else 0)
            assert r["steps"] == r["trajectory"][-1]["step"] and r["trajectory"][0]["step"] == 0
            # every layer logged, the readout included; each point's bracket is the best attack
            names = [n for n, m in E.mlp(2, 8, 2, depth=3).named_modules() if isinstance(m, torch.nn.Linear)]
            if case in E.TOY_CASES:
                assert list(r["trajectory"][-1]["sigmas"]) == names
            pts = r["points"]
            assert pts["upper"] == [min(ds) for ds in zip(*pts["by_method"].values())]
            assert set(pts["by_method"]) == set(cfg.attacks)
            # DeepFool ran on the first whitebox_points points only: the rest count as unbroken
            assert all(math.isinf(d) for d in pts["by_method"]["deepfool"][cfg.whitebox_points:])
            assert len(pts["by_method"]["deepfool"]) == len(pts["by_method"]["hsj"]) == len(pts["upper"])
        pen_layers = runs["rep-spectral"]["penalized_layers"]
        assert len(runs["ll-spectral"]["penalized_layers"]) == len(pen_layers) + 1  # the readout
    # the saved summary carries the per-point Lemma-1 check of every case and arm
    for row in res["summary"]:
        runs = [by_arm[row["arm"]] for by_arm in out["runs"][row["case"]].values()]
        assert row["lemma1_points_checked"] == sum(r.get("lemma1_points_checked", 0) for r in runs)
        assert row["lemma1_points_violated"] == 0
    assert sum(row["lemma1_points_checked"] for row in res["summary"]) > 0


def test_lemma1_check_counts_points_violations_and_min_ratio():
    import torch

    cert = torch.tensor([0.1, 0.5, 0.0, 0.3, 0.2, 0.3], dtype=torch.float64)
    measured = torch.tensor([1.0, 0.4, 2.0, 0.3, 0.2 * (1 + 1e-7), 0.2999], dtype=torch.float64)
    # 0.5 > 0.4 and 0.3 > 0.2999 are violations; 0.3 vs 0.3 and 0.2 vs 0.2 (1 + 1e-7) are within
    # the 1e-6 rounding allowance; the zero bound has no ratio
    assert E.lemma1_check(cert, measured) == {"lemma1_points_checked": 6, "lemma1_points_violated": 2,
                                              "lemma1_min_ratio": pytest.approx(0.8)}
    empty = E.lemma1_check(torch.zeros(0), torch.zeros(0))
    assert empty["lemma1_points_checked"] == 0 and empty["lemma1_points_violated"] == 0
    assert empty["lemma1_min_ratio"] != empty["lemma1_min_ratio"]  # nan: nothing to compare
    with pytest.raises(ValueError, match="same length"):
        E.lemma1_check(cert, measured[:3])


def _fake_run(checked, violated, min_ratio):
    run = {"probe_acc": 0.9, "clean_acc": 0.9, "min_l2": {"mean": 1.0, "median": 1.0}, "lemma1_empirical_mean": 0.5,
           "train_time_s": 1.0, "penalty_time_s": 0.1, "pgd_linf": {"0.05": 0.5}, "pgd_l2": {"1.0": 0.4},
           "steps": 10, "penalized_steps": 2, "batch_size": 4,
           "equilibrium": {"drift": 0.0, "layer": None, "reached": True, "logged_points": 2}}
    if checked is not None:
        run.update(lemma1_points_checked=checked, lemma1_points_violated=violated, lemma1_min_ratio=min_ratio)
    return run


def test_summary_sums_the_lemma1_check_over_seeds():
    cfg = E.Config(pgd_eps_linf=(0.05,), pgd_eps_l2=(1.0,))
    runs = {"toy-xor": {0: {a: _fake_run(20, 0, 3.5) for a in E.ARMS}, 1: {a: _fake_run(18, 1, 0.9) for a in E.ARMS}}}
    runs["toy-xor"][1]["vanilla"] = _fake_run(None, None, None)  # no certified bound in that run
    rows = {r["arm"]: r for r in E.summarize(runs, cfg)}
    assert (rows["rep-spectral"]["lemma1_points_checked"], rows["rep-spectral"]["lemma1_points_violated"],
            rows["rep-spectral"]["lemma1_min_ratio"]) == (38, 1, 0.9)
    assert (rows["vanilla"]["lemma1_points_checked"], rows["vanilla"]["lemma1_points_violated"],
            rows["vanilla"]["lemma1_min_ratio"]) == (20, 0, 3.5)


def _tiny_datasets(tmp_path):
    import numpy as np
    from test_data import _write_cifar, _write_idx

    rng = np.random.default_rng(0)
    for p, n in (("train", 40), ("t10k", 12)):
        _write_idx(tmp_path / f"{p}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(tmp_path / f"{p}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8) % 10)
    for i in range(1, 6):
        _write_cifar(tmp_path / f"data_batch_{i}", 8, i)
    _write_cifar(tmp_path / "test_batch", 10, 9)
    return tmp_path


def test_data_dir_cases_run_on_files_in_the_original_formats(tmp_path):
    (tmp_path / "data").mkdir()
    d = _tiny_datasets(tmp_path / "data")
    cfg = E.Config(cases=("mnist-full-mlp", "cifar-cnn"), data_dir=str(d), mlp_width=16, mlp_epochs=1, cnn_epochs=1,
                   attack_points=2, pgd_points=4, attack_steps=1, hsj_max_evals=10, pgd_eps_linf=(0.05,),
                   pgd_eps_l2=(1.0,), burn_in=0.0, out_dir=str(tmp_path / "out"), progress=False)
    out = E.reproduce(cfg)
    assert set(out["runs"]) == {"mnist-full-mlp", "cifar-cnn"}
    assert out["runs"]["cifar-cnn"][0]["rep-spectral"]["penalty_time_s"] > 0


def test_cli_data_dir_errors(tmp_path, capsys):
    from specreg_fast import cli

    assert cli.main(["reproduce", "--cases", "mnist-full-mlp", "--out", str(tmp_path)]) == 2
    assert "--data-dir" in capsys.readouterr().err
    assert cli.main(["reproduce", "--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert cli.main(["reproduce", "--cases", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown case(s) nope" in capsys.readouterr().err
    assert cli.main(["reproduce", "--gamma", "-1", "--out", str(tmp_path)]) == 2
    assert "--gamma must be" in capsys.readouterr().err
    # a folder without the files: the loader's error names the missing file
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        cli.main(["reproduce", "--data-dir", str(tmp_path / "empty"), "--cases", "mnist-full-mlp", "--out",
                  str(tmp_path), "--no-progress"])


def test_full_config_estimate_is_printed_and_fits_an_hour():
    assert E.estimate_minutes(E.full_config()) < 120
    assert len(E.full_config().seeds) >= 3 and E.full_config().attack_steps == 40


def _tiny_sweep_config(out_dir):
    return E.Config(cases=("mnist-mlp",), mlp_width=16, mlp_epochs=1, attack_points=2, pgd_points=4, attack_steps=1,
                    hsj_max_evals=10, pgd_eps_linf=(0.05,), pgd_eps_l2=(1.0,), burn_in=0.0, trajectory_points=2,
                    out_dir=str(out_dir), progress=False)


def _count_training(monkeypatch):
    trained = []
    real = E.train

    def counting(model, ds, arm, *a, **k):
        trained.append((arm, a[1]))  # (arm, gamma)
        return real(model, ds, arm, *a, **k)

    monkeypatch.setattr(E, "train", counting)
    return trained


def test_gamma_sweep_runs_each_gamma_in_its_own_folder(tmp_path, monkeypatch):
    trained = _count_training(monkeypatch)
    res = E.sweep_gamma(_tiny_sweep_config(tmp_path), gammas=(1e-3, 1.0))
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert set(sweep) == {"0.001", "1", "_sources"}
    for g in ("0.001", "1"):
        assert (tmp_path / f"gamma_{g}" / "results.json").exists()
    for g, r in res.items():  # each folder's penalized arms trained with its gamma
        runs = r["runs"]["mnist-mlp"][0]
        assert runs["rep-spectral"]["gamma"] == runs["ll-spectral"]["gamma"] == g and runs["vanilla"]["gamma"] == 0
    # vanilla does not depend on gamma: trained once, the same run in every gamma's table
    assert sorted(trained) == sorted([("vanilla", 1e-3), ("ll-spectral", 1e-3), ("rep-spectral", 1e-3),
                                      ("ll-spectral", 1.0), ("rep-spectral", 1.0)])
    assert res[1e-3]["runs"]["mnist-mlp"][0]["vanilla"] == res[1.0]["runs"]["mnist-mlp"][0]["vanilla"]


def test_gamma_sweep_reuses_an_earlier_run_with_the_same_budget(tmp_path, monkeypatch):
    cfg = _tiny_sweep_config(tmp_path / "earlier")
    cfg.gamma_mlp = cfg.gamma_cnn = 1.0
    earlier = E.reproduce(cfg)
    trained = _count_training(monkeypatch)
    res = E.sweep_gamma(_tiny_sweep_config(tmp_path / "sweep"), gammas=(1e-3, 1.0),
                        reuse=str(tmp_path / "earlier" / "results.json"))
    # only gamma 1e-3's penalized arms train; gamma 1's runs and everyone's vanilla come from the file
    assert sorted(trained) == [("ll-spectral", 1e-3), ("rep-spectral", 1e-3)]
    for g in (1e-3, 1.0):
        assert res[g]["runs"]["mnist-mlp"][0]["vanilla"]["points"] == earlier["runs"]["mnist-mlp"][0]["vanilla"]["points"]
    def key(rows):
        return [(r["arm"], r["min_l2"][0], r["probe_acc"][0], r["lemma1_cert"][0]) for r in rows]

    assert key(res[1.0]["summary"]) == key(earlier["summary"])
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["_sources"]["vanilla_runs_of_gamma"] == "1"
    # a run with another budget, or at a gamma outside the sweep, cannot stand in
    other = _tiny_sweep_config(tmp_path / "sweep2")
    other.mlp_epochs = 2
    with pytest.raises(ValueError, match="mlp_epochs=1"):
        E.sweep_gamma(other, gammas=(1e-3, 1.0), reuse=str(tmp_path / "earlier" / "results.json"))
    with pytest.raises(ValueError, match="gamma 1, not one of"):
        E.sweep_gamma(_tiny_sweep_config(tmp_path / "sweep3"), gammas=(1e-3, 1e-1),
                      reuse=str(tmp_path / "earlier" / "results.json"))


def test_sweep_gamma_cli_rejects_a_single_gamma(tmp_path):
    from specreg_fast import cli

    assert cli.main(["reproduce", "--sweep-gamma", "--gamma", "0.1", "--out", str(tmp_path)]) == 2
    # --reuse-run belongs to the sweep, and must be a results.json
    assert cli.main(["reproduce", "--reuse-run", str(tmp_path / "results.json"), "--out", str(tmp_path)]) == 2
    (tmp_path / "not.json").write_text("not json")
    assert cli.main(["reproduce", "--sweep-gamma", "--reuse-run", str(tmp_path / "not.json"), "--out",
                     str(tmp_path)]) == 2


def test_equilibrium_check_reads_the_drift_over_the_last_tenth_of_the_penalized_steps():
    def traj(values, start=100):
        # logged every 10 steps; the penalized phase runs from `start` to the last point
        return [{"step": start + 10 * i, "sigmas": {"a": v, "b": 1.0}} for i, v in enumerate(values)]

    settled = E._equilibrium(traj([2.0] * 5 + [1.0] * 6), ["a", "b"], start_step=100)
    assert settled["reached"] and settled["drift"] == 0.0
    # the last 10% of 100 penalized steps is the last 10 steps: 1.05 -> 1.0 is a 5% drift
    moving = E._equilibrium(traj([2.0, 1.5, 1.3, 1.2, 1.15, 1.12, 1.1, 1.08, 1.06, 1.05, 1.0]), ["a", "b"], 100)
    assert not moving["reached"] and moving["layer"] == "a" and moving["drift"] == pytest.approx(0.05)
    # layers that are not penalized do not count
    assert E._equilibrium(traj([2.0, 1.5, 1.3, 1.2, 1.15, 1.12, 1.1, 1.08, 1.06, 1.05, 1.0]), ["b"], 100)["reached"]
    assert not E._equilibrium(traj([1.0]), ["a"], 100)["reached"]  # one point: nothing to judge


def test_toy_weight_decay_reaches_the_optimizer():
    # the authors' XOR script trains with SGD weight decay 1e-4; --full uses it (without it,
    # lr 1 diverged to NaN there)
    assert E.full_config().toy_weight_decay == 1e-4
    cfg = E.Config(progress=False, trajectory_points=2)
    ds, _ = E._case_data("toy-xor", 0, cfg)
    norms = []
    for wd in (0.0, 0.5):
        torch.manual_seed(0)
        model = E.mlp(2, 8, ds.n_classes, depth=3, init_std=None)
        E.train(model, ds, "vanilla", 20, 0.0, cfg, 0, lr=0.1, weight_decay=wd)
        norms.append(sum(float(p.norm()) for p in model.parameters()))
    assert norms[1] < 0.8 * norms[0]


def test_a_diverging_run_is_recorded_and_left_out_instead_of_crashing(tmp_path, capsys):
    # lr 1e4 on the XOR toy overflows to inf/NaN within a few steps (lr 1 without weight decay
    # did so in a --full run and crashed it in the final SVD); the run is kept, marked
    # diverged, and the table, the paired intervals and the plots leave it out
    cfg = E.Config(cases=("toy-xor",), toy_epochs=30, toy_lr=(1e4, 0.1), seeds=(0, 1), attack_points=2, pgd_points=4,
                   attack_steps=1, hsj_max_evals=10, pgd_eps_linf=(0.05,), pgd_eps_l2=(1.0,), burn_in=0.5,
                   trajectory_points=4, out_dir=str(tmp_path), progress=False)
    out = E.reproduce(cfg)
    table = capsys.readouterr().out
    runs = out["runs"]["toy-xor"]
    for seed in cfg.seeds:
        for arm in E.ARMS:
            r = runs[seed][arm]
            assert r["diverged"] is not None and 0 <= r["diverged"] < r["steps"]
            assert all(math.isnan(v) for v in r["sigmas"].values()) and math.isnan(r["probe_acc"])
            assert r["points"]["upper"] == []
    rows = [r for r in out["summary"] if r["case"] == "toy-xor"]
    assert all(r["diverged"] == 2 and math.isnan(r["probe_acc"][0]) for r in rows)
    assert "diverged in 2/2 seeds" in table
    assert all(c["n"] == 0 and c["verdict"] == "no difference resolved" for c in out["paired"]["t_holm"])
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["runs"]["toy-xor"]["0"]["vanilla"]["diverged"] == runs[0]["vanilla"]["diverged"]
    assert os.path.getsize(tmp_path / "toy_decision_boundaries.png") > 1000

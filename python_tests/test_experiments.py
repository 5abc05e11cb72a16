"""A 1-epoch smoke run of every case of the reproduction, end to end (data, three arms,
probe, attacks, bounds, table, JSON, plots)."""
import json
import os

import pytest

pytest.importorskip("mlxtend")
pytest.importorskip("foolbox")
pytest.importorskip("torchattacks")
pytest.importorskip("matplotlib")

from specreg_fast import experiments as E  # noqa: E402


def test_every_case_runs_and_writes_outputs(tmp_path, capsys):
    cfg = E.Config(cases=("toy-xor", "mnist-mlp", "mnist-cnn", "transfer"), mlp_width=32, mlp_epochs=1, cnn_epochs=1,
                   toy_epochs=2, attack_points=3, attack_steps=1, hsj_max_evals=20, pgd_eps_linf=(0.05,),
                   pgd_eps_l2=(1.0,), burn_in=0.0, out_dir=str(tmp_path), progress=False)
    out = E.reproduce(cfg)
    table = capsys.readouterr().out
    for arm in E.ARMS:
        assert arm in table
    res = json.loads((tmp_path / "results.json").read_text())
    assert {r["case"] for r in res["summary"]} == set(cfg.cases)
    for f in ("robust_accuracy.png", "sigma_over_training.png", "toy_decision_boundaries.png"):
        assert os.path.getsize(tmp_path / f) > 1000
    for case in cfg.cases:
        runs = out["runs"][case][0]
        # the penalized arms really regularized (their penalty ran) and vanilla did not
        assert runs["vanilla"]["penalty_time_s"] == 0
        assert runs["rep-spectral"]["penalty_time_s"] > 0 and runs["ll-spectral"]["penalty_time_s"] > 0
        for arm in E.ARMS:
            r = runs[arm]
            assert 0.0 <= r["probe_acc"] <= 1.0
            if "certified_le_measured" in r:
                assert r["certified_le_measured"]

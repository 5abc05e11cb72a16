"""The docs' rules that a build alone would not catch: the README stays an entry point, its
headline table and every benchmark/reproduction table are generated from results/*.json (not
typed), every public name has an API entry, links resolve, the quickstarts run and stay short,
and the tutorial runner fails on a failing cell. (``make docs`` itself builds the site strictly
and executes every tutorial.)"""
import copy
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import specreg_fast as sf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
sys.path.insert(0, os.path.join(ROOT, "scripts", "docs"))
import run_tutorial  # noqa: E402
import tables  # noqa: E402


def read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def test_readme_is_an_entry_point_of_at_most_150_lines():
    assert len(read("README.md").splitlines()) <= 150


def test_readme_headline_table_is_the_generated_one():
    """The README's one table is exactly what scripts/docs/tables.py generates from
    results/bench_models_cpu.json, with that run's machine and date."""
    readme = read("README.md")
    assert tables.headline() in readme
    assert tables.machine(tables.load("bench_models_cpu.json")) in readme


def _results_copy(tmp_path):
    dst = tmp_path / "results"
    shutil.copytree(os.path.join(ROOT, "results"), dst, ignore=shutil.ignore_patterns("*.png", "*.log"))
    return str(dst)


def _edit(results, name, change):
    path = os.path.join(results, name)
    with open(path) as f:
        d = json.load(f)
    change(d)
    with open(path, "w") as f:
        json.dump(d, f)


def _set(keys, value):
    def change(d):
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return change


# (table, results file, what to change, a string the changed value must produce in the table)
MUTATIONS = [
    # bench_models_cpu.json: rows per model in arm order (step, reference, penalty(), accumulate_grad(), every=k)
    ("headline", "bench_models_cpu.json", (["rows", 3, "ratio_to_reference"], 9.876), "x | 9.88x | "),
    ("headline", "bench_models_cpu.json", (["rows", 1, "median_s"], 1.234), "| resnet50 | 1.23 s |"),
    ("headline", "bench_models_cpu.json", (["rows", 2, "ratio_to_reference"], 7.654), "| 7.65x | "),
    ("headline", "bench_models_cpu.json", (["rows", 3, "verdict"], "above 99%"), "above 99%"),
    ("ops", "bench_cpu.json", (["rows", 0, "median_s"], 1.234e-3), "| 1.23 ms |"),
    ("ops", "bench_cpu.json", (["machine", "date"], "1999-01-02 03:04:05 UTC"), "run 1999-01-02 03:04:05 UTC"),
    ("training", "bench_cpu.json", (["rows", -1, "note"], "+99.9% over the unpenalized step"), "+99.9% over the"),
    ("models", "bench_models_cpu.json", (["rows", 8, "share_of_step"], 0.5), "| 50.0% ["),
    ("models", "bench_models_cpu.json", (["machine", "machine"], "othermachine"), "machine `othermachine`"),
    ("models", "bench_models_cpu.json", (["rows", 3, "x_floor"], 98.7), ", 98.70x |"),
    ("distributed", "bench_distributed_cpu.json", (["rows", 0, "payload_ratio_naive_to_ours"], 123.4), "| 123.4 |"),
    ("distributed_counts", "bench_distributed_cpu.json", (["rows", 3, "payload_ratio_naive_to_ours"], 123.4),
     "| 123.4 |"),
    ("distributed_counts", "bench_distributed_cpu.json", (["rows", 4, "collectives_ours"], {"c10d.allreduce_": 7}),
     "| 7 |"),
    ("bounds", "bench_bounds.json", (["rows", 0, "exact"], 9.87654), "| 9.8765 |"),
    ("bounds", "bench_bounds.json", (["date"], "1999-01-02 03:04:05 UTC"), "run 1999-01-02 03:04:05 UTC"),
    ("reproduction", "reproduce_full/summary.json", (["summary", 0, "min_l2"], [7.777, 0.1]), "| 7.777±0.100 |"),
    ("reproduction_paired", "reproduce_full/summary.json", (["paired", "t_holm", 0, "verdict"], "a > b"), "| a > b |"),
    ("sweep", "sweep_gamma/sweep.json", (["0.1", "summary", 2, "probe_acc"], [0.5, 0.01]), "| 50.0±1.0% |"),
]


@pytest.mark.parametrize("table,name,change,expect", MUTATIONS,
                         ids=[f"{m[0]}-{'.'.join(map(str, m[2][0]))}" for m in MUTATIONS])
def test_tables_follow_the_results_json(tmp_path, table, name, change, expect):
    """Corrupt one value of a results file (a copy): the generated table changes with it, and
    the README/docs tables no longer match it."""
    results = _results_copy(tmp_path)
    before = tables.TABLES[table](results)
    assert expect not in before
    _edit(results, name, _set(*change))
    after = tables.TABLES[table](results)
    assert expect in after and after != before
    if table == "headline":
        assert after not in read("README.md")


def test_generated_tables_match_the_json_values():
    """A few cells against the JSON itself, computed here by hand (not through tables.py's helpers)."""
    d = tables.load("bench_bounds.json")
    r = d["rows"][3]
    assert f"| {r['layer']} | {r['exact']:.4f} | {r['cholesky']['ratio']:.4f} (" in tables.bounds()
    s = tables.load("reproduce_full/summary.json")["summary"]
    mlp = next(r for r in s if r["case"] == "mnist-mlp" and r["arm"] == "rep-spectral")
    assert f"| {mlp['min_l2'][0]:.3f}±{mlp['min_l2'][1]:.3f} |" in tables.reproduction()
    m = tables.load("bench_models_cpu.json")["rows"]
    vit = next(r for r in m if r["model"] == "vit_b_16" and r["arm"] == "ours (accumulate_grad)")
    pen = next(r for r in m if r["model"] == "vit_b_16" and r["arm"] == "ours (SpectralPenalty)")
    share = f"{100 * vit['share_of_step']:.1f}% [{100 * vit['share_low']:.1f}-{100 * vit['share_high']:.1f}]"
    assert (f"| vit_b_16 | " in tables.headline() and f"| {pen['ratio_to_reference']:.2f}x | "
            f"{vit['ratio_to_reference']:.2f}x | {share}, {vit['verdict']} |" in tables.headline())


@pytest.mark.parametrize("page", ["benchmarks.md", "reproduction.md"])
def test_results_pages_have_no_hand_written_tables(page):
    """Every table of the Benchmarks and Reproduction pages is a marker filled at build time."""
    text = read("docs", page)
    assert not [ln for ln in text.splitlines() if ln.lstrip().startswith("|")]
    markers = re.findall(r"<!--\s*table:\s*([a-z_]+)\s*-->", text)
    assert markers and set(markers) <= set(tables.TABLES)


def test_every_public_name_has_an_api_entry():
    api = "".join(read("docs", "api", f) for f in sorted(os.listdir(DOCS + "/api")))
    documented = set(re.findall(r"^::: specreg_fast\.([A-Za-z_]\w*)\s*$", api, re.M))
    assert set(sf.__all__) - documented == set()


def test_every_tutorial_is_in_the_nav_and_every_nav_page_exists():
    nav = re.findall(r":\s*([\w/]+\.md)\s*$", read("mkdocs.yml"), re.M)
    tutorials = {f"tutorials/{f[:-3]}.md" for f in os.listdir(DOCS + "/tutorials") if f.endswith(".py")}
    assert tutorials <= set(nav)
    for page in nav:
        src = os.path.join(DOCS, page)
        assert os.path.exists(src) or os.path.exists(src[:-3] + ".py"), page


def test_readme_links_resolve():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", read("README.md"))
    relative = [ln for ln in links if not re.match(r"[a-z]+://", ln)]
    assert relative
    assert [ln for ln in relative if not os.path.exists(os.path.join(ROOT, ln))] == []


def _block_after(text, heading):
    return re.search(heading + r".*?```python\n(.*?)```", text, re.S).group(1)


def test_readme_quickstart_runs_in_ten_lines():
    code = _block_after(read("README.md"), "## Quickstart")
    assert len(code.strip().splitlines()) <= 10
    ns = {}
    torch.manual_seed(0)
    exec(compile(code.replace("print(", "str("), "README quickstart", "exec"), ns)
    sig = ns["penalty"].sigmas()
    assert set(sig) == {"0", "2"}  # the hidden layers: the readout "4" is left free
    for name, s in sig.items():  # estimates from below of each layer's norm (at the weights before the last step)
        assert 0 < s <= torch.linalg.matrix_norm(ns["model"].get_submodule(name).weight, ord=2).item() * 1.1


def test_docs_quickstart_is_at_most_20_lines_of_code():
    cells, _ = run_tutorial.parse(read("docs", "quickstart.py"))
    code = [ln for kind, src in cells if kind == "code" for ln in src.splitlines() if ln.strip()]
    assert 0 < len(code) <= 20


def test_tutorial_runner_records_cells_and_fails_on_an_error(tmp_path):
    good = tmp_path / "good.py"
    good.write_text("# %% [markdown]\n# # Title\n\n# %%\nx = 6 * 7\nprint(x)\n\n# %%\nprint(x + 1)\n")
    out = tmp_path / "out"
    out.mkdir()
    runner = os.path.join(ROOT, "scripts", "docs", "run_tutorial.py")
    p = subprocess.run([sys.executable, runner, str(good), str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    cells = json.loads((out / "cells.json").read_text())
    assert [(c["kind"], c["output"]) for c in cells] == [("markdown", ""), ("code", "42\n"), ("code", "43\n")]
    assert cells[0]["source"] == "# Title"
    bad = tmp_path / "bad.py"
    bad.write_text("# %%\nprint('before')\n\n# %%\nraise ValueError('broken tutorial')\n")
    p = subprocess.run([sys.executable, runner, str(bad), str(out)], capture_output=True, text=True)
    assert p.returncode != 0 and "broken tutorial" in p.stderr


def test_no_tutorial_is_skipped_by_default_once_the_integrations_exist():
    """make docs skips the Trainer tutorial and the integrations API page only while
    specreg_fast.integrations is missing from the tree: once it is there, the default DOCS_SKIP
    must be empty, so that make test executes every tutorial."""
    import importlib.util

    default = re.search(r"^DOCS_SKIP \?=(.*)$", read("Makefile"), re.M).group(1).strip()
    if importlib.util.find_spec("specreg_fast.integrations") is None:
        assert set(default.split(",")) <= {"hf_trainer", "api-integrations"}
        pytest.skip("specreg_fast.integrations is not in this tree yet")
    assert default == ""


def _per_arm_results(tmp_path, monkeypatch):
    """A results dir whose bench_models_cpu.json is written by the ``specreg-fast bench --models``
    code path itself (benchmarks.models.run, then json.dump as cli.bench_models does) on a tiny
    CNN in place of the zoo (2 rounds, batch 4, every=2), the bandwidth fixed so the floor
    column is known."""
    import torch.nn as nn

    from specreg_fast.benchmarks import models as bm

    def tiny(image_size):
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                             nn.Flatten(), nn.Linear(8 * image_size * image_size, 10))

    monkeypatch.setitem(bm.MODELS, "tiny", (tiny, "4"))
    monkeypatch.setattr(bm, "read_bandwidth", lambda: 1e9)
    res = bm.run(["tiny"], batch=4, rounds=2, every=2, image_size=32)
    results = tmp_path / "results"
    results.mkdir()
    with open(results / "bench_models_cpu.json", "w") as f:
        json.dump(res, f, indent=1)
    return str(results), res


def test_models_tables_read_the_per_arm_rows(tmp_path, monkeypatch):
    """The per-arm rows of ``bench --models`` (share with its interval, verdict, floor, the
    every=k arm): every arm is a row of the models table with those cells, the headline gives
    accumulate_grad()'s share and verdict; cells computed here from the JSON by hand."""
    results, res = _per_arm_results(tmp_path, monkeypatch)
    md, head = tables.models(results), tables.headline(results)
    rows = {r["arm"]: r for r in res["rows"]}
    assert set(rows) == {"no penalty (step)", "reference", "ours (SpectralPenalty)", "ours (accumulate_grad)",
                         "ours (accumulate_grad, every=2)"}
    for arm, r in rows.items():
        line = next(ln for ln in md.splitlines() if f"| {arm} |" in ln)
        if arm == "no penalty (step)":
            assert line.startswith(f"| tiny ({r['maps']}) |")
            continue
        cell = f"{100 * r['share_of_step']:.1f}% [{100 * r['share_low']:.1f}-{100 * r['share_high']:.1f}]"
        assert f"| {r['ratio_to_reference']:.2f}x | {cell} | {r['verdict']} |" in line
        assert "unresolved" in r["verdict"]  # 2 rounds: no verdict
        if arm == "ours (accumulate_grad)":
            assert f", {r['median_s'] / (r['floor_bytes'] / 1e9):.2f}x |" in line
            assert f"| tiny | " in head and f"| {cell}, {r['verdict']} |" in head
    assert "batch 4, 32x32, 2 interleaved rounds" in md and "read bandwidth 1.0 GB/s" in md


def test_models_tables_follow_the_per_arm_json(tmp_path, monkeypatch):
    results, _ = _per_arm_results(tmp_path, monkeypatch)
    before = tables.models(results), tables.headline(results)
    i = next(k for k, r in enumerate(tables.load("bench_models_cpu.json", results)["rows"])
             if r["arm"] == "ours (accumulate_grad)")
    _edit(results, "bench_models_cpu.json", _set(["rows", i, "share_low"], 0.0123))
    _edit(results, "bench_models_cpu.json", _set(["rows", i, "verdict"], "below 5%"))
    after = tables.models(results), tables.headline(results)
    assert all("[1.2-" in a and "below 5%" in a and a != b for a, b in zip(after, before))

"""MkDocs hooks of the docs build (``make docs``; declared under ``hooks:`` in mkdocs.yml).

1. Tutorials: every ``docs/tutorials/*.py`` and ``docs/quickstart.py`` (Python files in the
   percent format, runnable as plain scripts) is executed at build time, each in a subprocess
   (``scripts/docs/run_tutorial.py``), on the CPU; its page is generated from its cells, with
   the output each cell printed and the figures it drew. A tutorial that fails (non-zero exit,
   or past ``SPECREG_DOCS_TIMEOUT`` seconds, 300 by default) fails the build. They run with
   ``SPECREG_DOCS_PYTHON`` (the project's ``.venv/bin/python`` under ``make docs``; mkdocs
   itself lives in ``.venv-docs``), ``SPECREG_DOCS_JOBS`` (2) at a time. A file's header
   lines ``# docs-launch: torchrun N`` (run under ``torchrun --nproc-per-node N``, gloo) and
   ``# docs-requires: MODULE`` are read here.
2. ``SPECREG_DOCS_SKIP=a,b`` (``make docs DOCS_SKIP=a,b``) names tutorials that are rendered
   without being run, and pages marked ``<!-- docs-skippable: NAME -->`` whose ``:::`` API
   directives are left out, each with a banner that says so; the build never skips on its own.
3. Tables: ``<!-- table: NAME -->`` in a page is replaced by ``scripts/docs/tables.py``'s
   ``TABLES[NAME]()``, generated from the committed ``results/*.json``.
4. The figures of the committed results (``results/**/*.png``) are served under ``results/``.
5. The docstrings' reST roles (``:func:`x```, rendered by mkdocstrings as ``:func:<code>x</code>``)
   become code, linked to the API reference when the name is a full ``specreg_fast.`` path.
"""
import concurrent.futures
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import run_tutorial  # noqa: E402
import tables  # noqa: E402

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc):<code>~?([^<]*)</code>")
TABLE = re.compile(r"<!--\s*table:\s*([a-z_]+)\s*-->")
SKIP = {s.strip() for s in os.environ.get("SPECREG_DOCS_SKIP", "").split(",") if s.strip()}
TIMEOUT = float(os.environ.get("SPECREG_DOCS_TIMEOUT", "300"))
JOBS = int(os.environ.get("SPECREG_DOCS_JOBS", "2"))
PYTHON = os.environ.get("SPECREG_DOCS_PYTHON", sys.executable)
SKIPPABLE = re.compile(r"<!--\s*docs-skippable:\s*([\w-]+)\s*-->")
SEEN_SKIPPABLE = set()
WORK_DIRS = []  # the tutorials' outputs, removed after the build


def _tutorials(docs_dir):
    return sorted(glob.glob(os.path.join(docs_dir, "tutorials", "*.py"))) + [os.path.join(docs_dir, "quickstart.py")]


def _run(path, out_dir):
    """Run one tutorial; returns (cells, seconds)."""
    with open(path) as f:
        _, meta = run_tutorial.parse(f.read())
    runner = os.path.join(HERE, "run_tutorial.py")
    launch = meta.get("launch", "python").split()
    if launch[0] == "torchrun":
        cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={launch[1]}",
               runner, path, out_dir]
    elif launch == ["python"]:
        cmd = [PYTHON, runner, path, out_dir]
    else:
        raise PluginError(f"{path}: unknown docs-launch {meta['launch']!r}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               MPLBACKEND="Agg", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        raise PluginError(f"tutorial {os.path.relpath(path, ROOT)} ran past {TIMEOUT:.0f} s (SPECREG_DOCS_TIMEOUT)")
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        hint = (f"\n(it needs {meta['requires']}; make docs DOCS_SKIP={os.path.splitext(os.path.basename(path))[0]} "
                f"renders it without running it)" if "requires" in meta else "")
        raise PluginError(f"tutorial {os.path.relpath(path, ROOT)} failed (exit {p.returncode}):\n"
                          f"{p.stdout[-3000:]}\n{p.stderr[-6000:]}{hint}")
    with open(os.path.join(out_dir, "cells.json")) as f:
        return json.load(f), seconds


def _page(path, cells, seconds, skipped):
    rel = os.path.relpath(path, ROOT)
    script = os.path.basename(path)
    with open(path) as f:
        launch = run_tutorial.parse(f.read())[1].get("launch", "python").split()
    command = f"python {rel}" if launch == ["python"] else f"torchrun --nproc-per-node {launch[1]} {rel}"
    out = []
    for k, c in enumerate(cells):
        if c["kind"] == "markdown":
            out.append(c["source"])
            if k == 0:  # after the title cell: where the page comes from
                if skipped:
                    out.append(f'!!! warning "Not executed in this build"\n    This build was made with '
                               f'`DOCS_SKIP` naming `{os.path.splitext(script)[0]}`: the code below is shown '
                               f'without its output.')
                else:
                    out.append(f'!!! info "Executed when these docs were built"\n    This page is '
                               f'[`{rel}`]({script}) run on the CPU at build time ({seconds:.0f} s); the outputs '
                               f'and figures below are what it printed and drew. Run it yourself with '
                               f'`{command}`.')
            continue
        out.append(f"```python\n{c['source']}\n```")
        if c.get("output", "").strip():
            out.append(f'```text title="output"\n{c["output"].rstrip()}\n```')
        for fig in c.get("figures", []):
            out.append(f"![{fig}]({fig})")
    return "\n\n".join(out) + "\n"


def on_files(files, config):
    docs_dir = config["docs_dir"]
    work = tempfile.mkdtemp(prefix="specreg-docs-")
    WORK_DIRS.append(work)
    jobs = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=JOBS) as pool:
        for path in _tutorials(docs_dir):
            name = os.path.splitext(os.path.basename(path))[0]
            out_dir = os.path.join(work, name)
            os.makedirs(out_dir)
            if name in SKIP:
                with open(path) as f:
                    parsed, _ = run_tutorial.parse(f.read())
                cells = [{"kind": k, "source": s, "output": "", "figures": []} for k, s in parsed]
                jobs[path] = (out_dir, (cells, 0.0, True))
            else:
                jobs[path] = (out_dir, pool.submit(_run, path, out_dir))
        for path, (out_dir, job) in jobs.items():
            cells, seconds, skipped = job if isinstance(job, tuple) else (*job.result(), False)
            src_dir = os.path.dirname(os.path.relpath(path, docs_dir))
            stem = os.path.splitext(os.path.basename(path))[0]
            uri = f"{src_dir}/{stem}.md" if src_dir else f"{stem}.md"
            files.append(File.generated(config, uri, content=_page(path, cells, seconds, skipped)))
            for c in cells:
                for fig in c.get("figures", []):
                    figure_uri = f"{src_dir}/{fig}" if src_dir else fig
                    files.append(File.generated(config, figure_uri, abs_src_path=os.path.join(out_dir, fig)))
            print(f"docs: {os.path.relpath(path, ROOT)}: " + ("skipped (DOCS_SKIP)" if skipped else f"{seconds:.1f} s"),
                  file=sys.stderr)
    for png in sorted(glob.glob(os.path.join(ROOT, "results", "**", "*.png"), recursive=True)):
        files.append(File.generated(config, os.path.relpath(png, ROOT), abs_src_path=png))
    return files


def on_page_markdown(markdown, page, config, files):
    m = SKIPPABLE.search(markdown)
    if m:
        SEEN_SKIPPABLE.add(m.group(1))
        if m.group(1) in SKIP:
            kept = [ln for ln in markdown.splitlines() if not ln.startswith(":::")]
            markdown = "\n".join(kept) + (f'\n\n!!! warning "Left out of this build"\n    This build was made with '
                                           f'`DOCS_SKIP` naming `{m.group(1)}`: the reference below is missing.\n')

    def table(m):
        name = m.group(1)
        if name not in tables.TABLES:
            raise PluginError(f"{page.file.src_uri}: no table named {name!r} (scripts/docs/tables.py)")
        return tables.TABLES[name]()

    return TABLE.sub(table, markdown)


def on_page_content(html, page, config, files):
    def role(m):
        name = m.group(1)
        if name.startswith("specreg_fast."):  # resolved by autorefs after every page is rendered; no warning if absent
            return f'<autoref identifier="{name}" optional><code>{name}</code></autoref>'
        return f"<code>{name}</code>"

    return ROLE.sub(role, html)


def on_post_build(config):
    while WORK_DIRS:
        shutil.rmtree(WORK_DIRS.pop(), ignore_errors=True)
    names = {os.path.splitext(os.path.basename(p))[0] for p in _tutorials(config["docs_dir"])} | SEEN_SKIPPABLE
    unknown = SKIP - names
    if unknown:
        raise PluginError(f"SPECREG_DOCS_SKIP names no tutorial or skippable page: {sorted(unknown)}")


def on_build_error(error):
    while WORK_DIRS:
        shutil.rmtree(WORK_DIRS.pop(), ignore_errors=True)

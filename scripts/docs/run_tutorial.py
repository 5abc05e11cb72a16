"""Run one tutorial (a Python file in the percent format) cell by cell and save what it shows.

    python scripts/docs/run_tutorial.py docs/tutorials/mlp_digits.py OUT_DIR

The tutorial is an ordinary script (``python docs/tutorials/mlp_digits.py`` runs it); this
runner executes its code cells in one namespace, in order, and records for each cell what it
printed (stdout and stderr, warnings included) and the matplotlib figures it left open (saved
as PNG and closed). It writes ``OUT_DIR/cells.json``: a list of ``{"kind", "source",
"output", "figures"}``. A cell that raises stops the run with a non-zero exit status and the
traceback on stderr, so the docs build fails. Under ``torchrun`` only rank 0 writes.

Used by the docs build (``scripts/docs/hooks.py``); not part of the package.
"""
import contextlib
import io
import json
import logging
import os
import re
import sys
import traceback
import warnings

MARKER = re.compile(r"^# %%(?P<md> \[markdown\])?\s*$")
META = re.compile(r"^# docs-(?P<key>[a-z]+):\s*(?P<value>.*?)\s*$")


def parse(text):
    """The tutorial's cells and its ``# docs-KEY: value`` lines: ([(kind, source)], {key: value})."""
    cells, meta, kind, lines = [], {}, None, []

    def flush():
        src = "\n".join(lines).strip("\n")
        if kind == "markdown":
            src = "\n".join(re.sub(r"^# ?", "", ln) for ln in src.splitlines())
        if src.strip():
            cells.append((kind, src))

    for line in text.splitlines():
        m = MARKER.match(line)
        if m:
            if kind is not None:
                flush()
            kind, lines = ("markdown" if m.group("md") else "code"), []
            continue
        mm = META.match(line)
        if mm and kind is None:  # metadata lines come before the first cell
            meta[mm.group("key")] = mm.group("value")
            continue
        if kind is None:
            if line.strip() and not line.startswith("#"):
                raise ValueError(f"code before the first '# %%' cell: {line!r}")
            continue
        lines.append(line)
    if kind is not None:
        flush()
    return cells, meta


def main(path, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # What a page shows of a warning: its category and message, not the build machine's paths.
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"{category.__name__}: {message}\n"
    # torch's note that the build machine has nvcc but no GPU (printed when inductor loads) is
    # about the machine that built the docs, not the tutorial.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    rank = int(os.environ.get("RANK", "0"))
    with open(path) as f:
        cells, _ = parse(f.read())
    name = os.path.splitext(os.path.basename(path))[0]
    ns = {"__name__": "__main__", "__file__": os.path.abspath(path)}
    record = []
    for i, (kind, src) in enumerate(cells):
        if kind == "markdown":
            record.append({"kind": kind, "source": src, "output": "", "figures": []})
            continue
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                exec(compile(src, f"{path} (cell {i})", "exec"), ns)
            except BaseException:
                err = traceback.format_exc()
            else:
                err = None
        if err is not None:
            sys.stderr.write(buf.getvalue() + err)
            sys.stderr.write(f"\n{path}: cell {i} failed\n")
            return 1
        figures = []
        for k, num in enumerate(plt.get_fignums()):
            fname = f"{name}_cell{i}_fig{k}.png"
            if rank == 0:
                plt.figure(num).savefig(os.path.join(out_dir, fname), dpi=90, bbox_inches="tight")
            figures.append(fname)
        plt.close("all")
        record.append({"kind": kind, "source": src, "output": buf.getvalue(), "figures": figures})
    if rank == 0:
        with open(os.path.join(out_dir, "cells.json"), "w") as f:
            json.dump(record, f)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: run_tutorial.py TUTORIAL.py OUT_DIR")
    sys.exit(main(sys.argv[1], sys.argv[2]))

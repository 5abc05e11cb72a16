"""Fuzz of the custom ops and the public API on edge-case and malformed input (issue 15).

Contract: every call either returns a finite answer of the right shape (checked against a
float64 PyTorch reference where that is cheap) or raises ValueError / TypeError /
RuntimeError with a message; never a dead process (SIGSEGV/SIGABRT/SIGFPE), a NaN from
finite input, or a hang. Hypothesis draws batches of cases (plain JSON dicts: geometries,
sizes including 0 and 1, strides including 0 in the weights' layout, dtypes, meta tensors,
mismatched list lengths); each batch runs in a subprocess of this file (`python
test_fuzz.py CASES.json`), under a timeout, so a crash fails the test with the case that
killed it instead of killing pytest. The conv batches run once per CPU kernel path
(SPECREG_FAST_CONV_KERNEL=direct and =aten), which must agree on what they reject.

The default run draws a fixed (derandomized) set that stays within a few seconds of
subprocess time; `-m slow` draws fresh random batches.
"""
import json
import math
import os
import subprocess
import sys
import tempfile

import pytest

HUGE = [2**31, 2**40, 2**62, 2**63 - 1]
OK_EXC = ("ValueError", "TypeError", "RuntimeError", "NotImplementedError")


# ----------------------------------------------------------------------------- cases
def _strategies():
    from hypothesis import strategies as st

    sizes = st.sampled_from([0, 1, 1, 2, 3, 5])
    layouts = st.sampled_from(["contig", "contig", "t", "expand_rows", "expand_cols", "expand_all", "slice",
                               "colslice", "overlap"])
    wdtypes = st.sampled_from(["float32"] * 4 + ["float64", "float64", "bfloat16", "float16", "int64", "complex64"])
    fills = st.sampled_from(["randn"] * 6 + ["zeros", "nan"])

    @st.composite
    def dense_case(draw):
        layers = [dict(m=draw(sizes), n=draw(sizes), layout=draw(layouts), dtype=draw(wdtypes), fill=draw(fills))
                  for _ in range(draw(st.integers(0, 3)))]
        return dict(kind="dense",
                    op=draw(st.sampled_from(["power_step_", "sigma", "spectral_norm", "spectral_norms"])),
                    layers=layers, n_iter=draw(st.sampled_from([0, 1, 1, 2, 5, -1])),
                    tol=draw(st.sampled_from([0.0, 0.0, 0.0, 1e-4, -1.0, float("nan")])),
                    perturb=draw(st.sampled_from([None] * 12 + ["u_len", "v_len", "drop_u", "u_dtype", "all_meta", "u_noncontig", "same_uv"])))

    # Conv geometries: a small valid layer (sizes 0 to 6, so empty inputs that padding makes
    # non-empty and kernels larger than the input come up), then, one case in two, a single
    # bad or extreme entry (overflowing products, stride 0, kernel size 0, a bogus mode ...).
    corruptions = st.sampled_from(["dilation_huge", "stride_huge", "pad_huge", "pad_overflow", "stride_0",
                                   "dilation_neg", "groups_0", "groups_huge", "kernel_0", "mode_bogus", "outpad",
                                   "asym", "pad_neg"])

    @st.composite
    def conv_case(draw):
        d = draw(st.sampled_from([1, 1, 2]))
        transposed = draw(st.sampled_from([False] * 4 + [True]))
        small = st.sampled_from([0, 0, 1, 1, 2, 3])
        geo = dict(d=d, transposed=transposed, groups=draw(st.sampled_from([1, 1, 2])),
                   cin_g=draw(st.sampled_from([1, 1, 2, 0])), cout_g=draw(st.sampled_from([1, 1, 2, 0])),
                   k=[draw(st.sampled_from([1, 2, 3, 5])) for _ in range(d)],
                   n=[draw(st.sampled_from([0, 1, 2, 3, 4, 6])) for _ in range(d)],
                   stride=[draw(st.sampled_from([1, 1, 2, 3])) for _ in range(d)],
                   dilation=[draw(st.sampled_from([1, 1, 2])) for _ in range(d)],
                   lo=[draw(small) for _ in range(d)], outpad=[0] * d,
                   mode="zeros" if transposed else draw(st.sampled_from(["zeros", "circular", "reflect",
                                                                         "replicate"])))
        geo["hi"] = list(geo["lo"])
        bad = draw(st.one_of(st.none(), corruptions))
        i = draw(st.integers(0, d - 1))
        if bad == "dilation_huge":
            geo["dilation"][i] = draw(st.sampled_from(HUGE))
        elif bad == "stride_huge":
            geo["stride"][i] = draw(st.sampled_from(HUGE))
        elif bad == "pad_huge":
            geo["lo"][i] = geo["hi"][i] = draw(st.sampled_from(HUGE))
        elif bad == "pad_overflow":
            geo["lo"][i], geo["hi"][i] = 2**62, 2**62
        elif bad == "stride_0":
            geo["stride"][i] = 0
        elif bad == "dilation_neg":
            geo["dilation"][i] = -1
        elif bad == "groups_0":
            geo["groups"] = 0
        elif bad == "groups_huge":
            geo["groups"] = 2**62
        elif bad == "kernel_0":
            geo["k"][i] = 0
        elif bad == "mode_bogus":
            geo["mode"] = "bogus"
        elif bad == "outpad":
            geo["outpad"][i] = draw(st.sampled_from([1, 2, 3]))
        elif bad == "asym":
            geo["hi"][i] = draw(small)
        elif bad == "pad_neg":
            geo["lo"][i] = -1
        return dict(kind="conv", bad=bad,
                    op=draw(st.sampled_from(["conv_power_step_", "conv_power_step_", "conv_sigma", "conv_adjoint",
                                             "conv_weight_grad", "conv_weight_grad_add_", "conv_operator_norms"])),
                    geo=geo, dtype=draw(st.sampled_from(["float32", "float32", "float64", "bfloat16"])),
                    fill=draw(fills), n_iter=draw(st.sampled_from([0, 1, 1, 2, -1])),
                    tol=draw(st.sampled_from([0.0, 0.0, 1e-3, float("inf")])),
                    perturb=draw(st.sampled_from([None] * 12 + ["params_short", "params_long", "modes_len", "xs_len",
                                                                "y_shape", "x_dtype", "x_noncontig", "all_meta"])))

    @st.composite
    def circular_case(draw):
        d = draw(st.sampled_from([1, 2]))
        s = [draw(st.sampled_from([1, 1, 2])) for _ in range(d)]
        dl = [draw(st.sampled_from([1, 1, 2])) for _ in range(d)]
        k = [draw(st.sampled_from([1, 2, 3])) for _ in range(d)]
        tot = [dl[i] * (k[i] - 1) for i in range(d)]
        geo = dict(d=d, transposed=False, groups=draw(st.sampled_from([1, 1, 2])),
                   cin_g=draw(st.sampled_from([1, 2, 0])), cout_g=draw(st.sampled_from([1, 2, 0])), k=k,
                   n=[s[i] * draw(st.sampled_from([0, 1, 2, 3])) for i in range(d)], stride=s, dilation=dl,
                   lo=[t // 2 for t in tot], hi=[t - t // 2 for t in tot], mode="circular", outpad=[0] * d)
        return dict(kind="conv", op=draw(st.sampled_from(["circular_power_step_", "circular_conv_norms"])), geo=geo,
                    dtype=draw(st.sampled_from(["float32", "float64"])), fill=draw(fills),
                    n_iter=draw(st.sampled_from([0, 1, 2])), tol=0.0,
                    perturb=draw(st.sampled_from([None] * 6 + ["y_shape", "xs_len", "params_short"])))

    return dense_case(), conv_case(), circular_case()


# ----------------------------------------------------------------------------- runner
def _run_batch(cases, kernel="auto", timeout=900):
    """Runs `cases` in one subprocess; returns the per-case records. A crash, a hang or a
    contract violation fails the calling test with the case printed."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(cases, f)
        path = f.name
    # the worker imports the package of this checkout (its script directory, not the root, is
    # on sys.path: without this it would import whichever specreg_fast is installed)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, SPECREG_FAST_CONV_KERNEL=kernel, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    try:
        try:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), path], capture_output=True, text=True,
                                  timeout=timeout, env=env, cwd=root)
        except subprocess.TimeoutExpired as e:
            started = [ln for ln in (e.stdout or b"").decode().splitlines() if ln.startswith("START ")]
            pytest.fail(f"kernel={kernel}: batch hung for {timeout} s; last case started: "
                        f"{cases[int(started[-1].split()[1])] if started else None}")
    finally:
        os.unlink(path)
    records, last = {}, None
    for ln in proc.stdout.splitlines():
        if ln.startswith("PACKAGE "):
            assert ln[8:].startswith(os.path.join(root, "")), f"the worker imported {ln[8:]}, not this checkout's package"
        elif ln.startswith("START "):
            last = int(ln.split()[1])
        elif ln.startswith("RESULT "):
            r = json.loads(ln[7:])
            records[r["i"]] = r
    if proc.returncode != 0 or len(records) != len(cases):
        pytest.fail(f"kernel={kernel}: worker died (exit code {proc.returncode}) on case "
                    f"{json.dumps(cases[last]) if last is not None else None}\n{proc.stderr[-3000:]}")
    bad = [f"{json.dumps(cases[i])}\n    -> {r['violations']}" for i, r in sorted(records.items()) if r["violations"]]
    assert not bad, f"kernel={kernel}: {len(bad)} contract violations:\n" + "\n".join(bad)
    return records


def _check_paths_agree(cases, recs):
    """The direct and ATen kernel paths accept and reject the same calls."""
    a, b = recs
    diff = [f"{json.dumps(c)}: direct {a[i]['outcome']} / aten {b[i]['outcome']}" for i, c in enumerate(cases)
            if a[i]["outcome"].split(":")[0] != b[i]["outcome"].split(":")[0]]
    assert not diff, "the kernel paths disagree:\n" + "\n".join(diff)


def _fuzz_test(strategy_index, batch, examples, derandomize, kernels, mixed=False):
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    strategy = _strategies()[strategy_index]

    @settings(max_examples=examples, deadline=None, derandomize=derandomize, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(st.lists(strategy, min_size=batch, max_size=batch))
    def run(cases):
        # (hypothesis's first example is the minimal one, every case alike: run it once)
        cases = list({json.dumps(c, sort_keys=True): c for c in cases}.values())
        if mixed:  # one meta tensor among CPU ones
            for c in cases:
                c["perturb"] = "meta_u" if c["kind"] == "dense" else "meta_x"
        recs = [_run_batch(cases, kernel=k) for k in kernels]
        if len(recs) == 2:
            _check_paths_agree(cases, recs)

    run()


def test_fuzz_dense():
    _fuzz_test(0, batch=60, examples=3, derandomize=True, kernels=("auto",))


def test_fuzz_conv_both_kernels():
    _fuzz_test(1, batch=80, examples=3, derandomize=True, kernels=("direct", "aten"))


def test_fuzz_circular():
    _fuzz_test(2, batch=30, examples=3, derandomize=True, kernels=("auto",))


def test_fuzz_mixed_meta_and_cpu_inputs_are_rejected():
    _fuzz_test(0, batch=15, examples=2, derandomize=True, kernels=("auto",), mixed=True)
    _fuzz_test(1, batch=15, examples=2, derandomize=True, kernels=("auto",), mixed=True)


@pytest.mark.slow
@pytest.mark.parametrize("which", [0, 1, 2])
def test_fuzz_long(which):
    kernels = ("direct", "aten") if which == 1 else ("auto",)
    _fuzz_test(which, batch=150, examples=8, derandomize=False, kernels=kernels)


# ----------------------------------------------------------------------------- worker
# Everything below runs in the subprocess.
def _make_tensor(torch, shape, dtype, layout="contig", fill="randn", gen=None):
    """A tensor of `shape` with the given memory layout (every layout holds the same kind of
    values; the stride-0 ones repeat them)."""
    dt = getattr(torch, dtype)
    real = torch.float32 if dt in (torch.int64, torch.complex64) else dt

    def rnd(*s):
        if fill == "zeros":
            return torch.zeros(*s, dtype=real)
        return torch.randn(*s, generator=gen, dtype=torch.float64).to(real)

    if len(shape) != 2 or layout == "contig":
        t = rnd(*shape)
    else:
        m, n = shape
        if layout == "t":
            t = rnd(n, m).t()
        elif layout == "expand_rows":
            t = rnd(1, n).expand(m, n)
        elif layout == "expand_cols":
            t = rnd(m, 1).expand(m, n)
        elif layout == "expand_all":
            t = rnd(1, 1).expand(m, n)
        elif layout == "slice":
            t = rnd(m, 2 * n + 1)[:, 1::2]
        elif layout == "colslice":
            t = rnd(1, n + 2).expand(m, n + 2)[:, 1:n + 1]
        else:  # overlap: a Hankel view, row i starts one entry after row i - 1
            t = torch.as_strided(rnd(m + n + 1), (m, n), (1, 1))
    if fill == "nan" and t.numel():
        t = t.clone()
        t.view(-1)[0] = float("nan")
    if dt == torch.int64:
        t = t.round().to(dt)
    elif dt == torch.complex64:
        t = t.to(dt)
    return t


def _finite(torch, ts):
    return all(bool(torch.isfinite(t.float()).all()) for t in ts if t.numel() and t.is_floating_point())


def _dense_case(torch, sf, c, gen):
    P = torch.ops.specreg_fast
    Ws = [_make_tensor(torch, (L["m"], L["n"]), L["dtype"], L["layout"], L["fill"], gen) for L in c["layers"]]
    acc = [torch.float64 if W.dtype == torch.float64 else torch.float32 for W in Ws]

    def unit(n, dt):
        v = torch.randn(n, generator=gen, dtype=torch.float64)
        return (v / v.norm().clamp_min(1e-30)).to(dt)

    us = [unit(W.shape[0], a) for W, a in zip(Ws, acc)]
    vs = [unit(W.shape[1], a) for W, a in zip(Ws, acc)]
    p = c["perturb"]
    if p == "meta_u" and (not us or c["op"] == "spectral_norm"):
        p = None  # nothing to put on meta
    if p == "u_len" and us:
        us[0] = unit(us[0].numel() + 1, acc[0])
    elif p == "v_len" and vs:
        vs[-1] = unit(max(vs[-1].numel() - 1, 0) + 2, acc[-1])
    elif p == "drop_u" and us:
        us = us[:-1]
    elif p == "u_dtype" and us:
        us[0] = us[0].to(torch.float16)
    elif p == "meta_u" and us:
        us[0] = us[0].to("meta")
    elif p == "all_meta":
        Ws, us, vs = [W.to("meta") for W in Ws], [u.to("meta") for u in us], [v.to("meta") for v in vs]
    elif p == "u_noncontig" and us:
        us[0] = torch.stack([us[0], us[0]], 1)[:, 0]
    elif p == "same_uv" and us and Ws[0].shape[0] == Ws[0].shape[1]:
        vs[0] = us[0]
    u0, v0 = [u.clone() for u in us], [v.clone() for v in vs]

    def call(Ws, us, vs):
        if c["op"] == "power_step_":
            return P.power_step_(Ws, us, vs, c["n_iter"], c["tol"])
        if c["op"] == "sigma":
            return P.sigma(Ws, us, vs)
        if c["op"] == "spectral_norm":
            return sf.spectral_norm(Ws[0]).reshape(1)
        return sf.spectral_norms(Ws, sf.PowerState(us, vs), n_iter=max(c["n_iter"], 0))

    if c["op"] == "spectral_norm":
        if not Ws:
            return "skip", []
        Ws = Ws[:1]
    out = call(Ws, us, vs)
    v = _dense_checks(torch, c, Ws, u0, v0, out, p)
    if not v and p is None and isinstance(out, torch.Tensor) and _finite(torch, Ws) and Ws:
        # the same call on contiguous copies of the weights (the kernels read any layout)
        ref = call([W.contiguous() for W in Ws], [u.clone() for u in u0], [v.clone() for v in v0])
        tol = 2e-2 if any(W.dtype in (torch.bfloat16, torch.float16) for W in Ws) else 1e-4
        if not torch.allclose(out.double(), ref.double(), rtol=tol, atol=1e-6):
            v.append(f"{out.tolist()} on the given layouts, {ref.tolist()} on contiguous copies")
    return out, v


def _dense_checks(torch, c, Ws, u0, v0, out, p):
    if p == "meta_u":
        return ["mixed meta/CPU inputs returned a value (expected an error)"]
    v = []
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(Ws),):
        return [f"result shape {getattr(out, 'shape', type(out))}, expected ({len(Ws)},)"]
    if out.device.type == "meta" or any(W.device.type == "meta" for W in Ws):
        if out.device.type != "meta":
            v.append(f"meta input gave a {out.device.type} result")
        return v
    if not Ws or p is not None:
        return v
    low = any(W.dtype in (torch.bfloat16, torch.float16) for W in Ws)
    rtol = 2e-2 if low else 1e-4
    for l, W in enumerate(Ws):
        o = float(out[l])
        if not _finite(torch, [W]):
            continue
        if not math.isfinite(o):
            v.append(f"layer {l}: {o} from a finite weight")
            continue
        W64 = W.to(torch.float64)
        exact = float(torch.linalg.matrix_norm(W64, ord=2)) if W.numel() else 0.0
        if c["op"] == "sigma" or (c["op"] in ("power_step_", "spectral_norms") and c["n_iter"] <= 0):
            ref = float(u0[l].double() @ W64 @ v0[l].double())
            if abs(o - ref) > rtol * (exact + 1e-6):
                v.append(f"layer {l}: u^T W v = {o}, reference {ref}")
        elif c["op"] == "spectral_norm":
            if not (exact * (1 - max(rtol, 1e-3)) - 1e-6 <= o <= exact * (1 + rtol) + 1e-6):
                v.append(f"sigma {o}, exact {exact}")
        elif o > exact * (1 + rtol) + 1e-6 or o < 0:
            v.append(f"layer {l}: estimate {o} outside [0, exact {exact}]")
    return v


def _conv_out_shape(g):
    """Output spatial sizes by the conv arithmetic with floor division (None: no output)."""
    out = []
    for i in range(g["d"]):
        n, k, s, dl = g["n"][i], g["k"][i], g["stride"][i], g["dilation"][i]
        if s < 1 or dl < 1 or k < 1:
            return None
        e = dl * (k - 1) + 1
        if g["transposed"]:
            o = (n - 1) * s - g["lo"][i] - g["hi"][i] + e + g["outpad"][i]
        else:
            if n + g["lo"][i] + g["hi"][i] < e:
                return None
            o = (n + g["lo"][i] + g["hi"][i] - e) // s + 1
        if o < 1:
            return None
        out.append(o)
    return out


def _ref_apply(torch, g, W, x):
    """The layer's map on one unbatched input, in float64, by torch.nn.functional."""
    F = torch.nn.functional
    d = g["d"]
    W, x = W.double(), x.double()[None]
    if g["transposed"]:
        f = [F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d][d - 1]
        return f(x, W, None, g["stride"], g["lo"], g["outpad"], g["groups"], g["dilation"])[0]
    pad = []
    for i in reversed(range(d)):
        pad += [g["lo"][i], g["hi"][i]]
    if any(pad):
        x = F.pad(x, pad, mode="constant" if g["mode"] == "zeros" else g["mode"])
    f = [F.conv1d, F.conv2d, F.conv3d][d - 1]
    return f(x, W, None, g["stride"], 0, g["dilation"], g["groups"])[0]


def _conv_case(torch, sf, c, gen):
    P = torch.ops.specreg_fast
    g, p = c["geo"], c["perturb"]
    d, G = g["d"], g["groups"]
    k = g["k"]
    Gs = G if 1 <= G <= 4 else 1  # the groups the tensors are shaped for
    if g["transposed"]:
        wshape, cin, cout = [g["cin_g"] * Gs, g["cout_g"]] + k, g["cin_g"] * Gs, g["cout_g"] * Gs
    else:
        wshape, cin, cout = [g["cout_g"] * Gs, g["cin_g"]] + k, g["cin_g"] * Gs, g["cout_g"] * Gs
    osp = _conv_out_shape(g)
    xshape = [cin] + g["n"]
    yshape = [cout] + (osp if osp is not None else [1] * d)
    if max(math.prod(wshape), math.prod(xshape), math.prod(yshape)) > 4096:
        return "skip", []
    acc = torch.float64 if c["dtype"] == "float64" else torch.float32
    W = _make_tensor(torch, wshape, c["dtype"], fill=c["fill"], gen=gen)
    x = torch.randn(xshape, generator=gen, dtype=torch.float64).to(acc)
    y = torch.randn(yshape, generator=gen, dtype=torch.float64).to(acc)
    x, y = x / x.norm().clamp_min(1e-30), y / y.norm().clamp_min(1e-30)
    params = [int(g["transposed"]), G]
    for key in ("stride", "dilation", "lo", "hi", "outpad"):
        params += g[key]
    modes = [g["mode"]]
    Ws, xs, ys = [W], [x], [y]
    if p == "params_short":
        params = params[:-1]
    elif p == "params_long":
        params = params + [0]
    elif p == "modes_len":
        modes = modes * 2
    elif p == "xs_len":
        xs = xs * 2
    elif p == "y_shape":
        ys = [torch.zeros([cout] + [v + 1 for v in yshape[1:]], dtype=acc)]
    elif p == "x_dtype":
        xs = [x.to(torch.float16)]
    elif p == "x_noncontig" and x.dim() >= 2 and x.shape[-1] > 1:
        xs = [torch.cat([x, x], -1)[..., ::2]]
    elif p == "meta_x":
        xs = [x.to("meta")]
    elif p == "all_meta":
        Ws, xs, ys = [W.to("meta")], [x.to("meta")], [y.to("meta")]
    x0, y0 = [t.clone() for t in xs], [t.clone() for t in ys]
    op = c["op"]
    if op == "conv_power_step_":
        out = P.conv_power_step_(Ws, xs, ys, params, modes, c["n_iter"], c["tol"])
    elif op == "conv_sigma":
        out = P.conv_sigma(Ws, xs, ys, params, modes)
    elif op == "conv_adjoint":
        out = P.conv_adjoint(Ws, xs, ys, params, modes)
    elif op == "conv_weight_grad":
        out = P.conv_weight_grad(Ws, xs, ys, params, modes)
    elif op == "conv_weight_grad_add_":
        grads = [torch.ones_like(w, dtype=acc) for w in Ws]
        P.conv_weight_grad_add_(grads, Ws, xs, ys, params, modes)
        out = [gr - 1 for gr in grads]
    elif op == "conv_operator_norms":
        if g["lo"] != g["hi"]:
            return "skip", []
        spec = sf.ConvSpec(weight=W, input_shape=tuple(xshape), stride=tuple(g["stride"]), padding=tuple(g["lo"]),
                           dilation=tuple(g["dilation"]), groups=G, padding_mode=g["mode"],
                           transposed=g["transposed"], output_padding=tuple(g["outpad"]) if g["transposed"] else ())
        out = sf.conv_operator_norms([spec], sf.ConvState(xs, ys), n_iter=max(c["n_iter"], 0))
    elif op == "circular_power_step_":
        x_tops, y_tops = [torch.empty_like(t) for t in xs], [torch.empty_like(t) for t in ys]
        out = P.circular_power_step_(Ws, xs, x_tops, y_tops, params, c["n_iter"])
    else:  # circular_conv_norms
        spec = sf.ConvSpec(weight=W, input_shape=tuple(xshape), stride=tuple(g["stride"]), padding=tuple(g["lo"]),
                           dilation=tuple(g["dilation"]), groups=G, padding_mode="circular")
        state = sf.init_circular_state([spec], generator=gen)
        out = sf.circular_conv_norms([spec], state, n_iter=max(c["n_iter"], 1))
    return out, _conv_checks(torch, c, osp, W, x0, y0, out)


def _conv_checks(torch, c, osp, W, x0, y0, out):
    g, op, p = c["geo"], c["op"], c["perturb"]
    if p == "meta_x":
        return ["mixed meta/CPU inputs returned a value (expected an error)"]
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    if any(t.device.type == "meta" for t in outs + [W] + x0 + y0):
        if any(t.device.type != "meta" for t in outs):
            return [f"meta input gave a {[t.device.type for t in outs]} result"]
        return []
    if osp is None:
        return [f"accepted a geometry with no output (kernel larger than the padded input, stride/dilation < 1 "
                f"or kernel size 0): returned {outs}"]
    if p is not None or not _finite(torch, [W]):
        return []
    v = [f"non-finite result {t}" for t in outs if not bool(torch.isfinite(t).all())]
    if v:
        return v
    x, y = x0[0], y0[0]
    zero = x.numel() == 0 or y.numel() == 0
    if op in ("conv_power_step_", "conv_operator_norms", "circular_power_step_", "circular_conv_norms"):
        est = float(outs[0][0]) if outs[0].dim() else float(outs[0])
        if zero:
            return [] if est == 0 else [f"zero-size operator: estimate {est}, expected 0"]
        if x.numel() > 256:
            return []
        try:
            J = torch.autograd.functional.jacobian(lambda t: _ref_apply(torch, g, W, t), x.double())
        except RuntimeError:
            return []
        exact = float(torch.linalg.matrix_norm(J.reshape(y.numel(), x.numel()), ord=2))
        tol = 1e-2 if c["dtype"] == "bfloat16" else 1e-4
        if op in ("conv_power_step_", "conv_operator_norms") and c["n_iter"] <= 0:
            ref = float((y.double() * _ref_apply(torch, g, W, x)).sum())
            return [] if abs(est - ref) <= tol * (exact + 1e-6) else [f"<y, A x> = {est}, reference {ref}"]
        if not (-1e-7 <= est <= exact * (1 + tol) + 1e-6):
            return [f"estimate {est} outside [0, exact {exact}]"]
        return []
    xd = x.double().requires_grad_(True)
    Wd = W.double().requires_grad_(True)
    if zero:
        ref_val, ref_adj, ref_gw = 0.0, torch.zeros_like(xd), torch.zeros_like(Wd)
    else:
        try:
            val = (y.double() * _ref_apply(torch, g, Wd, xd)).sum()
        except RuntimeError:
            return []
        ref_adj, ref_gw = torch.autograd.grad(val, (xd, Wd))
        ref_val = float(val)
    # <y, A x> and A^T y scale with W; the weight gradient, bilinear in the unit x and y, does not
    scale = (float(Wd.detach().norm()) if op in ("conv_sigma", "conv_adjoint") else 1.0) + 1e-6
    tol = 2e-2 if c["dtype"] == "bfloat16" else 1e-4
    if op == "conv_sigma":
        got, ref = outs[0].double().reshape(1), torch.tensor([ref_val], dtype=torch.float64)
    elif op == "conv_adjoint":
        got, ref = outs[0].double(), ref_adj
    else:
        got, ref = outs[0].double(), ref_gw
    if got.shape != ref.shape:
        return [f"result shape {tuple(got.shape)}, expected {tuple(ref.shape)}"]
    err = float((got - ref).abs().max()) if got.numel() else 0.0
    return [] if err <= tol * scale else [f"max error {err} against the reference (scale {scale})"]


def _worker(path):
    import torch

    import specreg_fast as sf

    torch.set_num_threads(1)
    print(f"PACKAGE {os.path.abspath(sf.__file__)}", flush=True)
    cases = json.load(open(path))
    for i, c in enumerate(cases):
        print(f"START {i}", flush=True)
        gen = torch.Generator().manual_seed(i)
        try:
            if c["kind"] == "dense":
                out, violations = _dense_case(torch, sf, c, gen)
            else:
                out, violations = _conv_case(torch, sf, c, gen)
            outcome = "skip" if isinstance(out, str) else "ok"
        except Exception as e:  # the contract: only these types, with a message
            name = type(e).__name__
            outcome = f"raised:{name}"
            violations = [] if (name in OK_EXC and str(e).strip()) else [f"{name}: {str(e)[:300]!r}"]
            if "INTERNAL ASSERT" in str(e):
                violations.append(f"internal assert: {str(e)[:300]}")
        print("RESULT " + json.dumps(dict(i=i, outcome=outcome, violations=violations)), flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1])

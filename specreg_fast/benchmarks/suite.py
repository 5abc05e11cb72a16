"""The benchmark suite behind ``specreg-fast bench``: should this package replace what you do
now, on this machine?

Every row times one implementation of one op on one shape; the plain-PyTorch reference of the
same group is timed interleaved with it (A B A B ..., so machine drift cancels in the ratio),
and each time is the median of repeated runs after warm-up, with the min-max range.

Groups and rows:
  * dense power step (one step, as in training): ours (``power_step_``), the reference loop
    (two ``mv`` + normalize), ``torch.nn.utils.parametrizations.spectral_norm`` (one
    training-mode forward: one power step plus the division it always does), and
    ``torch.linalg.matrix_norm(ord=2)`` (exact; small shapes).
  * conv operator step (ResNet-18/CIFAR shapes, zero padding): ours (``conv_power_step_``),
    the reference loop (``conv2d`` + ``conv_transpose2d``), ``spectral_norm`` on the conv
    module (NOTE: a different quantity, the reshaped-kernel matrix norm).
  * circular conv norm (the paper's FFT method, same shapes with circular padding): ours
    (matrix-free ``circular_power_step_``), the authors' construction (FFT of the zero-padded
    kernel + a batched block power step, plain PyTorch), exact (``eigvalsh`` of every block).
  * training step overhead (forward, backward, SGD; batch 128): no penalty, the reference
    penalty, ``SpectralPenalty`` added to the loss, and ``SpectralPenalty.accumulate_grad()``
    after the backward (the gradient written in place).
  * GPU (``--device cuda``, first): the dense step on 4096x4096 and 8192x8192 float32 per
    backend (CUDA C++, Triton, the reference kernel) and the plain reference loop (the ratio's
    base), timed with CUDA events; GB/s and its share of the GPU's nominal peak HBM bandwidth.
Relative error: the row's sigma after its timing runs (hundreds of warm steps) against the
exact value: ``matrix_norm`` (float64) for dense shapes up to 2048 x 2048, otherwise the
float64 power iteration run to a relative change below 1e-9; for the circular norm, the SVD
of every Fourier block. GB/s: bytes of the weights read once per step over the time, and its
fraction of this machine's read bandwidth measured by the suite (a ``sum`` over 256 MB).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import conv, fft, ops
from ..dense import init_power_state, spectral_norm
from ..geometry import ConvSpec
from .timing import fmt_time, interleaved, machine, paired_overhead, read_bandwidth

__all__ = ["SIZES", "run", "print_table", "plot", "to_json"]

# (C_in, C_out, kernel, stride, padding, input size) of ResNet-18 on CIFAR
RESNET18_CIFAR = [(3, 64, 3, 1, 1, 32), (64, 64, 3, 1, 1, 32), (64, 128, 3, 2, 1, 32), (128, 128, 3, 1, 1, 16),
                  (128, 256, 3, 2, 1, 16), (256, 256, 3, 1, 1, 8), (256, 512, 3, 2, 1, 8), (512, 512, 3, 1, 1, 4),
                  (64, 128, 1, 2, 0, 32), (128, 256, 1, 2, 0, 16), (256, 512, 1, 2, 0, 8)]

#: Shapes per size preset. "tiny" exists for the suite's own tests.
SIZES = {
    "full": dict(dense=[(1000, 784), (1024, 1024), (2048, 2048), (4096, 4096), (8192, 2048)],
                 mlp=[(1024, 784), (1024, 1024), (1024, 1024)],
                 conv=[RESNET18_CIFAR[i] for i in (1, 4, 7, 8)], circular=[RESNET18_CIFAR[i] for i in (1, 2, 7)],
                 training=True, repeats=11),
    "quick": dict(dense=[(1024, 1024), (4096, 4096)], mlp=[(1024, 784), (1024, 1024), (1024, 1024)],
                  conv=[RESNET18_CIFAR[i] for i in (1, 7)], circular=[RESNET18_CIFAR[1]], training=True, repeats=5),
    "tiny": dict(dense=[(64, 48)], mlp=[(32, 16), (32, 32)], conv=[(4, 8, 3, 2, 1, 8)], circular=[(4, 8, 3, 2, 1, 8)],
                 training=False, repeats=3),
}


def _row(group, op, shape, backend, t, ref_t, rel_err=None, nbytes=None, bw=None, note=""):
    r = {"group": group, "op": op, "shape": shape, "backend": backend, "median_s": t["median"], "min_s": t["min"],
         "max_s": t["max"], "reference_median_s": ref_t["median"], "ratio_vs_reference": ref_t["median"] / t["median"],
         "rel_err": rel_err, "gbps": None, "frac_read_bw": None, "note": note}
    if nbytes:
        r["gbps"] = nbytes / t["median"] / 1e9
        if bw:
            r["frac_read_bw"] = nbytes / t["median"] / bw
    return r


def _rel(est: float, exact: float) -> float:
    return abs(float(est) - exact) / exact if exact else abs(float(est))


def _dense_exact(W: torch.Tensor) -> float:
    if W.shape[0] * W.shape[1] <= 2048 * 2048:
        return float(torch.linalg.matrix_norm(W.double(), ord=2))
    return float(spectral_norm(W.double(), tol=1e-9, max_iter=20000))


# ----------------------------------------------------------------------------- dense
def dense_reference_step(Ws, us, vs) -> None:
    """The plain loop: per layer two matrix-vector products and two normalizations."""
    with torch.no_grad():
        for W, u, v in zip(Ws, us, vs):
            t = W @ v
            u.copy_(t / t.norm())
            a = W.t() @ u
            v.copy_(a / a.norm())


def dense_rows(shapes, mlp, repeats, bw, device) -> List[dict]:
    rows = []
    cases = [(f"{m}x{n}", [(m, n)]) for m, n in shapes] + [("MLP list " + "+".join(f"{m}x{n}" for m, n in mlp), mlp)]
    g = torch.Generator().manual_seed(0)
    for label, layers in cases:
        Ws = [torch.randn(m, n, generator=g).to(device) for m, n in layers]
        st = init_power_state(Ws, generator=torch.Generator().manual_seed(1))
        ru, rv = [u.clone() for u in st.us], [v.clone() for v in st.vs]

        fns: Dict[str, Callable] = {"ours": lambda Ws=Ws, st=st: ops.power_step_(Ws, st.us, st.vs, 1, 0.0),
                                    "reference": lambda Ws=Ws, ru=ru, rv=rv: dense_reference_step(Ws, ru, rv)}
        single = len(layers) == 1
        if single:
            lin = nn.Linear(layers[0][1], layers[0][0], bias=False).to(device)
            with torch.no_grad():
                lin.weight.copy_(Ws[0])
            sn = torch.nn.utils.parametrizations.spectral_norm(lin)
            fns["torch spectral_norm"] = lambda sn=sn: sn.weight
            if layers[0][0] * layers[0][1] <= 2048 * 2048:
                fns["matrix_norm(ord=2)"] = lambda W=Ws[0]: torch.linalg.matrix_norm(W, ord=2)
        t = interleaved(fns, repeats=repeats)
        exact = [_dense_exact(W) for W in Ws]
        nbytes = sum(W.numel() * W.element_size() for W in Ws)
        with torch.no_grad():
            est = {"ours": [float(u @ W @ v) for W, u, v in zip(Ws, st.us, st.vs)],
                   "reference": [float(u @ W @ v) for W, u, v in zip(Ws, ru, rv)]}
            if single:
                est["torch spectral_norm"] = [_sn_sigma(sn)]
                if "matrix_norm(ord=2)" in fns:
                    est["matrix_norm(ord=2)"] = [float(torch.linalg.matrix_norm(Ws[0], ord=2))]
        for k, v in t.items():
            err = max(_rel(e, x) for e, x in zip(est[k], exact))
            note = "exact, one SVD" if k.startswith("matrix_norm") else ""
            if nbytes <= 32 << 20 and k == "ours":
                note = "W stays in cache between steps: GB/s above DRAM's"
            rows.append(_row("dense", "power step", label, k, v, t["reference"], err, nbytes, bw, note))
    return rows


def _sn_sigma(sn: nn.Module) -> float:
    # torch's parametrization keeps u, v; its sigma estimate is u^T W v
    p = sn.parametrizations.weight[0]
    W = sn.parametrizations.weight.original
    return float(p._u @ W.detach().reshape(W.shape[0], -1) @ p._v)


# ----------------------------------------------------------------------------- conv operator
def _conv_module(cin, cout, k, s, p, g, device, mode="zeros"):
    m = nn.Conv2d(cin, cout, k, stride=s, padding=p, bias=False, padding_mode=mode).to(device)
    with torch.no_grad():
        m.weight.copy_(torch.randn(m.weight.shape, generator=g).to(device) * (2.0 / (cin * k * k)) ** 0.5)
    return m


def conv_rows(layers, repeats, device) -> List[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for cin, cout, k, s, p, n in layers:
        m = _conv_module(cin, cout, k, s, p, g, device)
        spec = ConvSpec.from_module(m, (cin, n, n), weight=m.weight.detach())
        st = conv.init_conv_state([spec], generator=torch.Generator().manual_seed(1))
        params, modes = ops.pack_conv_params([spec])
        W = spec.weight
        xr = st.xs[0].clone()
        est_ref = [0.0]

        def reference(xr=xr, W=W, est_ref=est_ref):
            with torch.no_grad():
                y = F.conv2d(xr[None], W, None, s, p)
                y = y / y.norm()
                op = tuple(n - ((y.shape[2 + i] - 1) * s - 2 * p + k) for i in range(2))
                a = F.conv_transpose2d(y, W, None, s, p, op)
                est_ref[0] = a.norm()
                xr.copy_((a / est_ref[0])[0])

        sn_mod = _conv_module(cin, cout, k, s, p, torch.Generator().manual_seed(0), device)
        with torch.no_grad():
            sn_mod.weight.copy_(W)
        sn = torch.nn.utils.parametrizations.spectral_norm(sn_mod)
        fns = {"ours": lambda: ops.conv_power_step_([W], st.xs, st.ys, params, modes, 1, 0.0),
               "reference": reference, "torch spectral_norm": lambda: sn.weight}
        t = interleaved(fns, repeats=repeats)
        m64 = _conv_module(cin, cout, k, s, p, g, device).double()
        with torch.no_grad():
            m64.weight.copy_(W)
        exact = float(conv.conv_operator_norm(m64, (cin, n, n), tol=1e-9, max_iter=20000).detach())
        with torch.no_grad():
            ours = float(ops.conv_sigma([W], st.xs, st.ys, params, modes))
        label = f"{cin}->{cout} k{k} s{s} @{n}"
        rows.append(_row("conv", "operator step", label, "ours", t["ours"], t["reference"], _rel(ours, exact)))
        rows.append(_row("conv", "operator step", label, "reference", t["reference"], t["reference"],
                         _rel(est_ref[0], exact)))
        rows.append(_row("conv", "operator step", label, "torch spectral_norm", t["torch spectral_norm"],
                         t["reference"], _rel(_sn_sigma(sn), exact),
                         note="reshaped-kernel norm: a different quantity"))
    return rows


# ----------------------------------------------------------------------------- circular (FFT) norm
def _authors_blocks(W: torch.Tensor, n: int, s: int) -> torch.Tensor:
    cout, cin, k, _ = W.shape
    Kp = W.new_zeros(cout, cin, n, n)
    Kp[:, :, :k, :k] = W
    m = n // s
    Kp = Kp.reshape(cout, cin, m, s, m, s).permute(0, 1, 3, 5, 2, 4)
    return torch.fft.fft2(Kp).reshape(cout, cin * s * s, m * m).permute(2, 0, 1)


def circular_rows(layers, repeats, device) -> List[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for cin, cout, k, s, p, n in layers:
        m = _conv_module(cin, cout, k, s, (k - 1) // 2, g, device, mode="circular")
        spec = ConvSpec.from_module(m, (cin, n, n), weight=m.weight.detach())
        st = fft.init_circular_state([spec], generator=torch.Generator().manual_seed(1))
        params = fft.circular_params(spec)
        W = spec.weight
        nb = (n // s) ** 2
        v = torch.randn(nb, cin * s * s, dtype=torch.complex64, generator=torch.Generator().manual_seed(2)).to(device)
        est_auth = [0.0]

        def authors(W=W, v=v, est_auth=est_auth):
            with torch.no_grad():
                P = _authors_blocks(W, n, s)
                u = (P @ v.unsqueeze(-1)).squeeze(-1)
                est_auth[0] = u.norm(dim=1).max()
                a = (P.conj().transpose(1, 2) @ u.unsqueeze(-1)).squeeze(-1)
                v.copy_(a / a.norm(dim=1, keepdim=True).clamp_min(1e-30))

        def exact_blocks(W=W):
            P = _authors_blocks(W, n, s)
            G = P @ P.conj().transpose(1, 2) if P.shape[1] <= P.shape[2] else P.conj().transpose(1, 2) @ P
            return torch.linalg.eigvalsh(G)[:, -1].clamp_min(0).sqrt().max()

        fns = {"ours": lambda: ops.circular_power_step_([W], st.xs, params, 1), "reference": authors,
               "exact eigvalsh": exact_blocks}
        t = interleaved(fns, repeats=repeats, min_time=0.0)
        exact = float(fft.circular_conv_norms([ConvSpec(**{**spec.__dict__, "weight": W.double()})], exact=True))
        ours = float(ops.circular_power_step_([W], [st.xs[0].clone()], params, 0)[0])
        label = f"{cin}->{cout} k{k} s{s} @{n}"
        rows.append(_row("circular", "FFT-method step", label, "ours (matrix-free)", t["ours"], t["reference"],
                         _rel(ours, exact)))
        rows.append(_row("circular", "FFT-method step", label, "reference (authors' blocks)", t["reference"],
                         t["reference"], _rel(est_auth[0], exact)))
        rows.append(_row("circular", "FFT-method step", label, "exact eigvalsh", t["exact eigvalsh"], t["reference"],
                         _rel(exact_blocks(), exact), note="exact, all blocks"))
    return rows


# ----------------------------------------------------------------------------- training overhead
def make_mlp():
    return nn.Sequential(nn.Linear(784, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 1024),
                         nn.GELU(), nn.Linear(1024, 10)), (784,)


def make_cnn():
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(64, 10)), (3, 32, 32)


class _BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


def make_resnet18():
    """ResNet-18 for CIFAR (3x3 stem, no max-pool): its 20 convs are the RESNET18_CIFAR shapes."""
    layers, cin = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()], 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10)]
    return nn.Sequential(*layers), (3, 32, 32)


class ReferencePenalty:
    """The plain way, on the maps a (finalized) :class:`SpectralPenalty` regularizes: a Python
    loop over them, per map one power step under no_grad (dense: two matvecs of its weight,
    built in full for a LoRA map; conv: conv and its adjoint at the layer's input size), then
    sigma by autograd through u^T W v or <y, conv(x)>; ``sum gamma_l sigma_l^2``."""

    def __init__(self, pen):
        from .. import reference as ref

        self.ref = ref
        self.dense = [mp for mp in pen._layers if not mp.conv]
        self.convs = [(mp, conv.ConvSpec.from_module(mp.module, pen._input_shapes[mp.owner])) for mp in pen._convs]
        self.gammas = [float(g) for g in pen.gammas]
        like = [mp.like() for mp in self.dense]
        self.v = [F.normalize(torch.randn(w.shape[1], device=w.device, dtype=w.dtype), dim=0) for w in like]
        self.x = [F.normalize(torch.randn(spec.input_shape, device=spec.weight.device, dtype=spec.weight.dtype
                                          ).flatten(), dim=0).view(spec.input_shape) for _, spec in self.convs]

    def __call__(self) -> torch.Tensor:
        terms = []
        for i, mp in enumerate(self.dense):
            W = mp.weight()
            with torch.no_grad():
                u = F.normalize(W @ self.v[i], dim=0)
                self.v[i] = F.normalize(W.t() @ u, dim=0)
            terms.append(u @ W @ self.v[i])
        for i, (mp, spec) in enumerate(self.convs):
            spec = dataclasses.replace(spec, weight=mp.weight())  # the live weight: sigma's gradient
            with torch.no_grad():
                y = self.ref.conv_apply(spec, self.x[i][None])
                y = y / y.norm()
                x = self.ref.conv_adjoint(spec, y)[0]
                self.x[i] = x / x.norm()
            terms.append((y * self.ref.conv_apply(spec, self.x[i][None])).sum())
        return sum(g * t ** 2 for g, t in zip(self.gammas, terms))  # gammas: dense maps, then convs


def penalized_model(model: nn.Module, inputs: torch.Tensor, gamma: float = 1e-2, **penalty_kw):
    """(reference penalty, SpectralPenalty) on ``model``, both initialized by one forward of
    ``inputs`` (the conv input sizes) and one call."""
    from ..penalty import SpectralPenalty

    pen = SpectralPenalty(model, gamma=gamma, **penalty_kw)
    with torch.no_grad():
        model(inputs)
    pen()
    return ReferencePenalty(pen), pen


def penalty_arms(model: nn.Module, refpen: "ReferencePenalty", pen) -> Dict[str, Callable[[], object]]:
    """The penalty alone, forward and backward, gradients added into existing ``.grad``: the
    reference penalty + backward, ``penalty()`` + backward, ``accumulate_grad()``."""
    for q in model.parameters():
        if q.requires_grad:
            q.grad = torch.zeros_like(q)
    return {"reference": lambda: refpen().backward(), "ours (SpectralPenalty)": lambda: pen().backward(),
            "ours (accumulate_grad)": pen.accumulate_grad}


def training_arms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, refpen: "ReferencePenalty", pen,
                  loss_fn: Optional[Callable] = None) -> Dict[str, Callable[[], object]]:
    """Step functions of the four arms (no penalty, reference, SpectralPenalty in the loss,
    SpectralPenalty.accumulate_grad) sharing one model, SGD optimizer and batch."""
    opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=1e-3)
    crit = loss_fn or nn.CrossEntropyLoss()

    def step(extra, after=None):
        def run_():
            loss = crit(model(x), y)
            if extra is not None:
                loss = loss + extra()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if after is not None:
                after()
            opt.step()
        return run_

    return {"no penalty": step(None), "reference": step(refpen), "ours (SpectralPenalty)": step(pen),
            "ours (accumulate_grad)": step(None, pen.accumulate_grad)}


def build_penalized(make, device, batch):
    """(model, random batch of ``batch`` inputs, reference penalty, SpectralPenalty) for a
    ``make() -> (model, input shape)``."""
    torch.manual_seed(0)
    model, in_shape = make()
    model.to(device)
    x = torch.randn(batch, *in_shape, device=device)
    refpen, pen = penalized_model(model, x[:2])
    return model, x, refpen, pen


def training_rows(repeats, device) -> List[dict]:
    rows = []
    for label, make in (("MLP 784-1024x3-10", make_mlp), ("CNN 3x32x32", make_cnn)):
        model, x, refpen, pen = build_penalized(make, device, 128)
        y = torch.randint(0, 10, (128,), device=device)
        t = interleaved(training_arms(model, x, y, refpen, pen), repeats=repeats, min_time=0.0)
        base = t["no penalty"]["median"]
        for k in ("reference", "ours (SpectralPenalty)", "ours (accumulate_grad)"):
            over = paired_overhead(t, k, "no penalty")
            rows.append(_row("training", "step overhead", label, k, t[k], t["reference"],
                             note=f"{100 * over:+.1f}% over the unpenalized step ({fmt_time(base)})"))
        # the penalty's own forward + backward, without the step's noise around it
        model, _, refpen, pen = build_penalized(make, device, 2)
        t = interleaved(penalty_arms(model, refpen, pen), repeats=3 * repeats)
        for k in ("ours (SpectralPenalty)", "ours (accumulate_grad)"):
            rows.append(_row("training", "penalty cost", label, k, t[k], t["reference"],
                             note=f"{t[k]['median'] / t['reference']['median']:.2f}x the reference penalty's time"))
    return rows


# ----------------------------------------------------------------------------- GPU backends
#: Dense shapes of the GPU rows: W (64 MB and 256 MB in float32) far larger than the L2 cache, so
#: every step reads it from HBM.
GPU_DENSE = [(4096, 4096), (8192, 8192)]


def gpu_peak_bandwidth(name: str) -> Optional[float]:
    """Nominal peak HBM bandwidth (bytes/s) of a GPU by its name, where known."""
    from .roofline import PEAK_BW

    return next((bw for gpu, bw in PEAK_BW.items() if gpu in name), None)


def gpu_rows(shapes, repeats) -> List[dict]:
    """Dense step per backend on CUDA (and the plain reference loop, the ratio's base), timed
    with CUDA events (only where a GPU exists). GB/s: W's bytes per step over the time; its
    share of the GPU's nominal peak HBM bandwidth where the GPU is known."""
    from .. import backends

    rows = []
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    peak = gpu_peak_bandwidth(name)
    for m, n in shapes:
        W = [torch.randn(m, n, device=dev)]
        times = {}
        for b in ["reference loop"] + backends.available(dev):
            st = init_power_state(W)
            if b == "reference loop":
                def step(st=st):
                    dense_reference_step(W, st.us, st.vs)
            else:
                def step(st=st, b=b):
                    backends.power_step_(W, st.us, st.vs, 1, 0.0, backend=b)
            for _ in range(3):
                step()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            samples = []
            for _ in range(repeats):
                start.record()
                for _ in range(10):
                    step()
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end) / 10 / 1e3)
            samples.sort()
            times[b] = {"median": samples[len(samples) // 2], "min": samples[0], "max": samples[-1]}
        note = f"share of the {name}'s nominal {peak / 1e12:.2f} TB/s" if peak else "GPU peak bandwidth unknown"
        for b, t in times.items():
            rows.append(_row("gpu", "power step (CUDA events)", f"{m}x{n}", b, t, times["reference loop"],
                             nbytes=W[0].numel() * 4, bw=peak, note=note))
    return rows


# ----------------------------------------------------------------------------- driver
def run(size: str = "full", device: str = "cpu", progress: Optional[Callable[[str], None]] = None) -> dict:
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device here (torch.cuda.is_available() is False)")
    cfg = SIZES[size]
    say = progress or (lambda s: None)
    info = machine()
    say("measuring read bandwidth")
    bw = read_bandwidth() if device == "cpu" else None
    rows: List[dict] = []
    if device == "cuda":  # first: the rows a short GPU session is for
        say("GPU backends (CUDA events)")
        rows += gpu_rows(GPU_DENSE, cfg["repeats"])
    say("dense power step")
    rows += dense_rows(cfg["dense"], cfg["mlp"], cfg["repeats"], bw, device)
    say("conv operator step")
    rows += conv_rows(cfg["conv"], cfg["repeats"], device)
    say("circular (FFT) norm")
    rows += circular_rows(cfg["circular"], max(3, cfg["repeats"] // 2), device)
    if cfg["training"]:
        say("training-step overhead")
        rows += training_rows(cfg["repeats"], device)
    roof = None
    if device != "cuda":
        import contextlib
        import io

        from . import roofline

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            data = roofline.main([])
        roof = {"text": buf.getvalue(), "data": data}
    return {"machine": info, "size": size, "device": device, "read_bandwidth_Bps": bw, "rows": rows,
            "gpu_roofline_estimate": roof}


def _fmt_err(e):
    return "n/a" if e is None else ("0" if e == 0 else f"{e:.1e}")


def print_table(res: dict, file=None) -> None:
    m = res["machine"]
    bw = res["read_bandwidth_Bps"]
    print(f"specreg-fast bench ({res['size']}) | {m['processor']} | torch {m['torch']} | {m['threads']} threads | "
          f"{m['cpu_capability']} | read bandwidth {bw / 1e9:.1f} GB/s | {m['date']}" if bw else
          f"specreg-fast bench ({res['size']}) | {res['device']} | torch {m['torch']} | {m['date']}", file=file)
    head = (f"{'op':<17}{'shape':<28}{'backend':<28}{'time (median)':>14}{'min-max':>22}{'vs ref':>8}"
            f"{'rel.err':>9}{'GB/s':>7}{'of BW':>7}  note")
    print(head, file=file)
    print("-" * len(head), file=file)
    for r in res["rows"]:
        mm = f"{fmt_time(r['min_s'])}-{fmt_time(r['max_s'])}"
        gb = "" if r["gbps"] is None else f"{r['gbps']:.1f}"
        fr = "" if r["frac_read_bw"] is None else f"{100 * r['frac_read_bw']:.0f}%"
        print(f"{r['op']:<17}{r['shape'][:27]:<28}{r['backend']:<28}{fmt_time(r['median_s']):>14}{mm:>22}"
              f"{r['ratio_vs_reference']:>7.2f}x{_fmt_err(r['rel_err']):>9}{gb:>7}{fr:>7}  {r['note']}", file=file)
    print("vs ref: the reference's median time / the row's (same group, timed interleaved); rel.err: the row's "
          "sigma after its timed steps vs exact.", file=file)
    if res.get("gpu_roofline_estimate"):
        print("\nNo GPU here: GPU kernels as a memory-roofline ESTIMATE (not measured):\n", file=file)
        print(res["gpu_roofline_estimate"]["text"], file=file)


def to_json(res: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(res, f, indent=1, default=str)


def plot(res: dict, path: str) -> None:
    """Bar chart of the ratios to the reference (log scale), one bar per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["rows"] if not r["backend"].startswith("reference")]
    labels = [f"{r['group']}: {r['shape'][:22]} {r['backend'][:22]}" for r in rows]
    vals = [r["ratio_vs_reference"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(rows) + 1.2))
    ax.barh(range(len(rows)), vals, color=["tab:green" if v >= 1 else "tab:red" for v in vals])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed vs the plain-PyTorch reference (x, log scale; >1 = faster)")
    ax.set_title(f"specreg-fast bench ({res['size']}, {res['device']}, {res['machine']['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

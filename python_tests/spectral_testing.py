"""Shared test helpers (imported by the test modules; pytest puts this folder on sys.path)."""
import torch


def matrix_with_gap(m, n, gap=0.8, dtype=torch.float64, seed=0):
    """Random m x n matrix with singular values 1, gap, gap^2 ... (a known sigma_2/sigma_1)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = gap ** torch.arange(k, dtype=torch.float64)
    return ((U * s) @ V.t()).to(dtype)


# ----------------------------------------------------------------------------- distributed runs
# Shared by test_distributed_maps.py and test_distributed_mesh.py (their spawned ranks and the
# single-process reference run the same loop).
def data_loss(model, x):
    """A data term of the model's output (logits for transformers models)."""
    y = model(x)
    return (y.logits if hasattr(y, "logits") else y).square().mean()


def train_and_record(model, pen, batches, mode, rank):
    """SGD steps on `batches` (each a list of per-rank inputs: `rank` None takes them all) with the
    penalty on the autograd route (`mode == "loss"`) or accumulate_grad(); the penalty per step
    and the first step's gradients."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    hist, first = [], None
    for xs in batches:
        x = torch.cat(xs) if rank is None else xs[rank]
        opt.zero_grad()
        data = data_loss(model, x)
        if mode == "loss":
            p = pen()
            (data + p).backward()
        else:
            data.backward()
            p = pen.accumulate_grad()
        hist.append(float(p.detach()))
        if first is None:
            first = [q.grad.detach().clone() if q.grad is not None else torch.zeros(q.shape)
                     for q in model.parameters()]
        opt.step()
    return hist, first


def local_box(t):
    """(local tensor, global offset per dim) of a DTensor (any placements) or a plain tensor."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(t, DTensor):
        return t.detach().clone(), (0,) * t.dim()
    _, off = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t.to_local().detach().clone(), tuple(off)


def assert_close(a, b, what, rel=1e-5):
    """Same shapes and max |a - b| <= rel * max |b| (in float64; 1e-12 where b is zero or empty)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    err = (a - b).abs().max() if a.numel() else torch.zeros(())
    assert a.shape == b.shape and err <= rel * max(float(b.abs().max()) if b.numel() else 0.0, 1e-12), \
        f"{what}: max abs error {float(err):.3g} (shapes {tuple(a.shape)} / {tuple(b.shape)})"


def block_of(T, local, off):
    """The block of the whole tensor `T` that a rank's `local` shard at offset `off` holds."""
    return T[tuple(slice(o, o + n) for o, n in zip(off, local.shape))]


def assert_rank_matches_single(r, pen, hist, first, weights, label, steps):
    """One spawned rank's record `r` (sigmas, penalty per step, first-step gradients and weights
    after `steps` steps as local boxes, the penalty's buffers) against the single-process run of
    the same steps (`pen`, `hist`, `first`, `weights`), at rel 1e-5."""
    assert r["sigmas"].keys() == pen.sigmas().keys()
    assert_close(list(r["sigmas"].values()), list(pen.sigmas().values()), f"{label} sigmas")
    assert_close(r["pen"], hist, f"{label} penalties")
    for j, ((g, off), G) in enumerate(zip(r["grads"], first)):
        assert_close(g, block_of(G, g, off), f"{label} first-step grad of param {j}")
    for j, ((w, off), W) in enumerate(zip(r["weights"], weights)):
        assert_close(w, block_of(W, w, off), f"{label} param {j} after {steps} steps")
    for k, b in pen.state_dict().items():
        if isinstance(b, torch.Tensor) and b.is_floating_point():
            assert_close(r["buffers"][k], b, f"{label} buffer {k}")


def assert_compiled_step_matches_eager(make, batch, steps):
    """Two identical penalized models from `make()` (each `(model, penalty)`): for `steps` batches
    from `batch()`, the loss `mean(model(x)^2) + penalty()` and its parameter gradients under
    torch.compile (aot_eager, fullgraph) equal eager to rounding. Returns both penalties (eager,
    compiled) for the caller's checks of their state."""
    (me, pe), (mc, pc) = make(), make()

    def loss_fn(model, pen, x):
        return model(x).square().mean() + pen()

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    for _ in range(steps):
        x = batch()
        le = loss_fn(me, pe, x)
        ge = torch.autograd.grad(le, list(me.parameters()))
        lc = compiled(mc, pc, x)
        gc = torch.autograd.grad(lc, list(mc.parameters()))
        torch.testing.assert_close(lc, le)
        for a, b in zip(gc, ge):
            torch.testing.assert_close(a, b)
    return pe, pc

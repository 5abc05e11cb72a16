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

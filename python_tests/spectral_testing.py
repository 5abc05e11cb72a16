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

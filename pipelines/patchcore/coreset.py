"""Greedy k-center coreset of the patch features (the memory bank's subsampling)."""
from __future__ import annotations

import math

import torch

from pipelines.training import CancelFn, ProgressFn, check_cancelled, report


def greedy_coreset(features: torch.Tensor, n: int, projection_dim: int = 128, seed: int = 0,
                   progress: ProgressFn | None = None, cancelled: CancelFn | None = None) -> torch.Tensor:
    """Greedy k-center coreset (Sener & Savarese; PatchCore's "greedy coreset") on a Gaussian
    random projection to ``projection_dim`` dimensions.

    ``features: [N x D]`` → indices ``[n]`` (int64) of the selected rows, in selection order.
    Starts from one seeded random row; each step selects the row farthest from everything
    selected so far. Exact greedy, accelerated with the triangle inequality: a row ``x`` whose
    nearest centre is ``a`` can only move closer to the new centre ``c`` if
    ``|a − c| < 2·|x − a|``, so each step computes distances (one ``addmv``) only for those
    candidate rows — a few % of ``N`` after the first steps — plus ``[i]`` centre-centre
    distances. All steps are batched torch ops (``index_select``, ``addmv``), O(N) cheap passes
    instead of an O(N·k) product per step.
    """
    N, D = features.shape
    if n >= N:
        return torch.arange(N)
    if n <= 0:
        raise ValueError(f"coreset size must be positive, got {n}")
    gen = torch.Generator().manual_seed(int(seed))
    z = features.float()
    if projection_dim and D > projection_dim:
        proj = torch.randn(D, projection_dim, generator=gen) / math.sqrt(projection_dim)
        z = z @ proj                                                 # [N x k]
    z = z.contiguous()
    k = z.shape[1]
    sq = (z * z).sum(1)                                              # [N]  |x|²
    centres = torch.empty(n, k)                                      # [n x k] selected rows
    centres_sq = torch.empty(n)
    selected = torch.empty(n, dtype=torch.long)
    assign = torch.zeros(N, dtype=torch.long)                        # nearest centre (its rank)
    idx = int(torch.randint(N, (1,), generator=gen))
    c = z[idx]
    min_d2 = torch.addmv(sq, z, c, alpha=-2.0).add_(sq[idx]).clamp_min_(0)   # [N] squared
    bound = 4 * min_d2                                               # (2·|x − a|)²
    step = max(1, n // 50)
    for i in range(n):
        if i:
            c = z[idx]
            # squared distances from the new centre to the earlier centres: [i]
            dc2 = torch.addmv(centres_sq[:i], centres[:i], c, alpha=-2.0).add_(sq[idx])
            cand = (dc2.index_select(0, assign) < bound).nonzero().squeeze(1)
            d2 = torch.addmv(sq.index_select(0, cand), z.index_select(0, cand), c, alpha=-2.0)
            d2.add_(sq[idx]).clamp_min_(0)
            closer = d2 < min_d2.index_select(0, cand)
            upd, d2 = cand[closer], d2[closer]
            min_d2[upd] = d2
            bound[upd] = 4 * d2
            assign[upd] = i
        selected[i] = idx
        centres[i] = c
        centres_sq[i] = sq[idx]
        idx = int(torch.argmax(min_d2))
        if i % step == 0:
            check_cancelled(cancelled, "PatchCore")
            report(progress, i / n, f"coreset {i}/{n}")
    return selected


def greedy_coreset_reference(features: torch.Tensor, n: int, projection_dim: int = 128,
                             seed: int = 0) -> torch.Tensor:
    """The plain O(n·N·k) greedy loop (one full ``addmv`` per step); same selection as
    :func:`greedy_coreset`, kept for tests and benchmarks."""
    N, D = features.shape
    if n >= N:
        return torch.arange(N)
    gen = torch.Generator().manual_seed(int(seed))
    z = features.float()
    if projection_dim and D > projection_dim:
        z = z @ (torch.randn(D, projection_dim, generator=gen) / math.sqrt(projection_dim))
    z = z.contiguous()
    sq = (z * z).sum(1)
    selected = torch.empty(n, dtype=torch.long)
    idx = int(torch.randint(N, (1,), generator=gen))
    min_d2 = torch.full((N,), float("inf"))
    for i in range(n):
        selected[i] = idx
        torch.minimum(min_d2, torch.addmv(sq, z, z[idx], alpha=-2.0).add_(sq[idx]), out=min_d2)
        idx = int(torch.argmax(min_d2))
    return selected

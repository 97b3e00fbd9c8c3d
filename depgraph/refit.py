"""Least-squares re-fit of a consumer layer whose input columns are removed: the maths, on plain tensors.

A consumer ``y = W x`` (``W`` [out, in]) reads a channel space; a plan removes its input columns ``P`` and keeps
``S``. With the calibration inputs ``X`` [tokens, in] and their Gram matrix ``H = X^T X`` the kept weights that
change the outputs least solve

    min_{W'_S}  ||W X^T - W'_S X_S^T||^2 + lambda ||W'_S - W_S||^2
    =>  W'_S = W_S + W_P H_PS (H_SS + lambda I)^-1                                   (ZipLM / SlimGPT one-shot form)

``lambda = damp * mean(diag H_SS)`` (the SparseGPT dampening; 0 gives the plain least-squares solution). A bias is
an extra input column that is always 1: append ``sum(X)`` and ``n`` to ``H`` (:func:`augment`) and the bias to
``W`` and it is re-fitted with the others (never dampened). Updating *only* that column is FLAP's bias
compensation: ``b' = b + W_P mean(X_P)`` (:func:`mean_fill`). ``update`` chooses which kept columns may move:
the others stay as they are and the fit uses what they leave.

The Optimal Brain Surgeon cost of removing unit ``j`` (one column) with every other column re-fitted is
``||W_:,j||^2 / [H^-1]_jj``; for a unit of several columns ``G`` (an attention head) it is
``tr(W_G ([H^-1]_GG)^-1 W_G^T)`` (:func:`obs_costs`). :func:`obs_select` removes units greedily by that cost,
one step at a time, re-fitting the kept columns and downdating ``H^-1`` after each (ZipLM's structured OBS): the
cost then accounts for what was already removed.

The output errors come from the solve itself (:class:`Refit`): with ``delta = W'_S - W_S`` and ``R = W_P H_PS`` the
error left is ``tr(W_P H_PP W_P^T) - tr(R delta^T) - lambda ||delta||^2``, a few products of [out, |S|] instead of
the [out, in] x [in, in] one that :func:`output_error` pays (seconds instead of a minute on a 7B ``down_proj``).
When fewer columns are removed than the layer has outputs the solve takes ``H_SP``'s |P| right-hand sides instead
of ``R``'s ``out`` (``delta = W_P (H_SS^-1 H_SP)^T``): 47 s instead of 60 s on a 7B ``down_proj`` at 20%.

The solve runs in float64 by default, or in the ``dtype`` asked (float32 when ``H`` was accumulated in float32 for
half-precision weights: :mod:`depgraph.reconstruct`); only the blocks a solve reads are copied to that dtype.
Shapes: ``W`` [out, in], ``H`` [in, in], index lists into ``in``.
"""
from __future__ import annotations

import numpy as np
import torch

from dataclasses import dataclass

__all__ = ["Refit", "augment", "dampen", "refit", "refit_solve", "mean_fill", "obs_costs", "obs_select", "output_error"]


def augment(gram: torch.Tensor, total: torch.Tensor, count: int) -> torch.Tensor:
    """Gram matrix of ``[X, 1]``: ``[[X^T X, X^T 1], [1^T X, n]]`` [in + 1, in + 1] (the last column is the bias)."""
    n = gram.shape[0]
    out = torch.empty(n + 1, n + 1, dtype=gram.dtype, device=gram.device)
    out[:n, :n] = gram
    out[:n, n] = total
    out[n, :n] = total
    out[n, n] = float(count)
    return out


def dampen(H: torch.Tensor, damp: float, columns=None) -> torch.Tensor:
    """``H + damp * mean(diag H[columns]) * I`` on ``columns`` (all when None); a copy in float64."""
    H = H.to(torch.float64).clone()
    idx = torch.arange(H.shape[0], device=H.device) if columns is None else torch.as_tensor(columns, device=H.device)
    if damp > 0 and len(idx):
        H[idx, idx] += damp * float(H[idx, idx].mean().clamp_min(1e-12))
    return H


@dataclass
class Refit:
    """One consumer's re-fit: ``new`` [out, len(update)] in the solve's dtype, and ``||W X^T - W' X^T||^2`` over the calibration
    tokens before (the removed columns zeroed, nothing re-fitted) and after."""

    new: torch.Tensor
    error_before: float
    error_after: float


def refit_solve(W: torch.Tensor, H: torch.Tensor, removed, update, damp: float = 0.01, undamped=(),
                dtype: torch.dtype = torch.float64) -> Refit:
    """New values of the columns ``update`` of ``W`` [out, in] after the columns ``removed`` are deleted.

    ``W'_U = W_U + W_P H_PU (H_UU + lambda I)^-1`` with ``lambda = damp * mean(diag H_UU)`` on every updated
    column but those in ``undamped`` (a bias column). Columns neither removed nor updated keep their weights and
    need no term: they are the same before and after. The errors come from the solve (module docstring).
    ``dtype``: of the gathered blocks, the Cholesky factor and the solve (float32 halves the time and memory of a
    7B ``down_proj``; the dampening keeps ``H_UU`` well conditioned).
    """
    P = torch.as_tensor(list(removed), dtype=torch.long, device=H.device)
    U = torch.as_tensor(list(update), dtype=torch.long, device=H.device)
    W_P = W[:, P].to(dtype)  # copies of the columns in play only (a 7B down_proj: 1.5 GB less peak than all of W)
    before = float(torch.einsum("oi,ij,oj->", W_P, H[P[:, None], P].to(dtype), W_P)) if len(P) else 0.0
    if len(P) == 0 or len(U) == 0:
        return Refit(W[:, U].to(dtype), before, before)
    H_UU = H[U[:, None], U].to(dtype)  # a copy (one gather, no [|U|, in] intermediate): dampened in place
    skip = set(undamped)
    lam_cols = [i for i, u in enumerate(U.tolist()) if u not in skip]
    every = len(lam_cols) == len(U)
    lam_idx = torch.as_tensor(lam_cols, dtype=torch.long, device=H.device)
    lam = damp * float(H_UU[lam_idx, lam_idx].mean().clamp_min(1e-12)) if damp > 0 and len(lam_cols) else 0.0
    if lam:
        H_UU[lam_idx, lam_idx] += lam
    H_PU = H[P[:, None], U].to(dtype)  # [|P|, |U|]
    L, info = torch.linalg.cholesky_ex(H_UU)
    if int(info) == 0:
        del H_UU
        if len(P) < W.shape[0]:  # |P| right-hand sides instead of out: Z = H_UU^-1 H_UP, delta = W_P Z^T
            Z = torch.cholesky_solve(H_PU.T, L)  # [|U|, |P|]
            del L
            delta = W_P @ Z.T
            gain = float(torch.einsum("op,pq,oq->", W_P, H_PU @ Z, W_P))  # tr(W_P H_PU delta^T)
            del Z
        else:
            rhs = W_P @ H_PU  # [out, |U|]
            delta = torch.cholesky_solve(rhs.T, L).T
            del L
            gain = float(rhs.mul_(delta).sum())
            del rhs
        del W_P, H_PU
        shrunk = torch.linalg.vector_norm(delta if every else delta[:, lam_idx]) ** 2
        after = max(before - gain - lam * float(shrunk), 0.0)
        new = delta.add_(W[:, U].to(dtype))
    else:  # singular even with dampening (dead inputs): the minimum-norm solution, its error measured directly
        new = W[:, U].to(dtype) + (W_P @ H_PU) @ torch.linalg.pinv(H_UU, hermitian=True)
        after = output_error(W, H, removed, new, update)
    return Refit(new, before, after)


def refit(W: torch.Tensor, H: torch.Tensor, removed, update, damp: float = 0.01, undamped=(),
          dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """:func:`refit_solve`'s new columns only: ``[out, len(update)]`` in ``dtype``."""
    return refit_solve(W, H, removed, update, damp, undamped, dtype).new


def mean_fill(W: torch.Tensor, mean: torch.Tensor, removed) -> torch.Tensor:
    """FLAP's bias compensation, the mean-only case of :func:`refit`: the bias increment ``W_P mean(X_P)`` [out]."""
    P = torch.as_tensor(list(removed), dtype=torch.long, device=W.device)
    return W[:, P].to(torch.float64) @ mean.to(torch.float64).to(W.device)[P]


def obs_costs(W: torch.Tensor, H: torch.Tensor, unit_of_index, damp: float = 0.01) -> np.ndarray:
    """OBS cost of removing each unit (all others re-fitted): ``tr(W_G ([H^-1]_GG)^-1 W_G^T)`` per unit ``G``.

    ``unit_of_index`` [in]: the unit each input column belongs to (-1: none). Returns float64 [num_units]."""
    uoi = np.asarray(unit_of_index)
    n_units = int(uoi.max()) + 1 if (uoi >= 0).any() else 0
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(dampen(H, damp)))
    W = W.to(torch.float64)
    out = np.zeros(n_units)
    sizes = np.bincount(uoi[uoi >= 0], minlength=n_units)
    if (sizes == 1).all():  # one column per unit (neurons): ||W_:,j||^2 / [H^-1]_jj, vectorised
        cols = np.flatnonzero(uoi >= 0)
        per_col = ((W ** 2).sum(0) / torch.diagonal(Hinv)).cpu().numpy()
        out[uoi[cols]] = per_col[cols]
        return out
    for u in range(n_units):
        G = torch.as_tensor(np.flatnonzero(uoi == u), dtype=torch.long, device=H.device)
        if len(G) == 0:
            continue
        WG = W[:, G]
        if len(G) == 1:
            out[u] = float((WG ** 2).sum() / Hinv[G[0], G[0]])
        else:
            out[u] = float(torch.trace(WG @ torch.linalg.solve(Hinv[G][:, G], WG.T)))
    return out


def _unit_columns(unit_of_index) -> list:
    """The input columns of each unit: ``[LongTensor, ...]`` indexed by unit (``unit_of_index`` [in], -1: none)."""
    uoi = np.asarray(unit_of_index)
    n_units = int(uoi.max()) + 1 if (uoi >= 0).any() else 0
    return [torch.as_tensor(np.flatnonzero(uoi == u), dtype=torch.long) for u in range(n_units)]


def obs_select(W: torch.Tensor, H: torch.Tensor, unit_of_index, count: int, damp: float = 0.01,
               step: int = 1, candidates=None) -> list:
    """``count`` units to remove, chosen greedily: each round removes the ``step`` units of least OBS cost
    (:func:`obs_costs` with the columns removed so far gone and the kept ones re-fitted), then re-fits ``W`` and
    downdates ``H^-1`` (``W -= W_J [H^-1_JJ]^-1 H^-1_J:``, ``H^-1 -= H^-1_:J [H^-1_JJ]^-1 H^-1_J:``; ``J`` the
    removed columns). ``step=1``: the unit whose removal leaves the least re-fit error given those already
    removed, at every round. ``candidates``: the only unit ids that may be removed (None: all; the others stay
    and are re-fitted). Returns the unit ids, in removal order.

    The downdates are kept as rows ``V`` (``H^-1 = H0^-1 - V^T V``, ``V_J = L^-1 H^-1_J:`` with
    ``L L^T = H^-1_JJ``): a round reads the diagonal and the rows ``J`` of ``H^-1``, never the whole matrix."""
    cols = _unit_columns(unit_of_index)
    if not 0 <= count < max(len(cols), 1):
        raise ValueError(f"obs_select: count must be in [0, {len(cols) - 1}], got {count}")
    allowed = range(len(cols)) if candidates is None else sorted({int(u) for u in candidates})
    if any(not 0 <= u < len(cols) for u in allowed) or count > len(allowed):
        raise ValueError(f"obs_select: {count} units to remove from {len(allowed)} candidates among {len(cols)} units")
    W = W.to(torch.float64).clone()
    H0inv = torch.cholesky_inverse(torch.linalg.cholesky(dampen(H, damp)))
    diag = torch.diagonal(H0inv).clone()
    n_cols = sum(len(cols[u]) for u in range(len(cols)))
    V = torch.empty(min(n_cols, H0inv.shape[0]), H0inv.shape[0], dtype=torch.float64, device=H0inv.device)
    k = 0  # rows of V in use
    single = all(len(c) == 1 for c in cols)
    idx = torch.cat(cols).to(H0inv.device) if single and cols else None
    alive = torch.zeros(len(cols), dtype=torch.bool)
    alive[list(allowed)] = True
    gone = torch.zeros(H0inv.shape[0], dtype=torch.bool, device=H0inv.device)
    order: list = []
    while len(order) < count:
        if single:  # one column per unit: ||W_:,j||^2 / [H^-1]_jj, vectorised
            cost = ((W[:, idx] ** 2).sum(0) / diag[idx].clamp_min(1e-300)).cpu()
        else:
            cost = torch.zeros(len(cols), dtype=torch.float64)
            for u in torch.nonzero(alive).flatten().tolist():
                c = cols[u].to(H0inv.device)
                block = H0inv[c][:, c] - V[:k, c].T @ V[:k, c]
                cost[u] = float(torch.trace(W[:, c] @ torch.linalg.solve(block, W[:, c].T)))
        cost[~alive] = float("inf")
        take = torch.argsort(cost, stable=True)[:min(step, count - len(order))].tolist()
        J = torch.cat([cols[u] for u in take]).to(H0inv.device)
        rows = H0inv[J] - V[:k, J].T @ V[:k]  # [|J|, in]: the rows J of the current H^-1
        rows[:, gone] = 0.0
        L = torch.linalg.cholesky(rows[:, J])
        new = torch.linalg.solve_triangular(L, rows, upper=False)  # L^-1 H^-1_J:
        W -= W[:, J] @ torch.cholesky_solve(rows, L)
        V[k:k + len(J)] = new
        k += len(J)
        diag -= (new ** 2).sum(0)
        gone[J] = True
        W[:, J] = 0.0
        alive[take] = False
        order += take
    return order


def output_error(W: torch.Tensor, H: torch.Tensor, removed, new_update=None, update=()) -> float:
    """``||W X^T - W' X^T||^2`` over the calibration tokens, from the Gram matrix: ``W'`` is ``W`` with the
    ``removed`` columns zeroed and the ``update`` columns replaced by ``new_update`` [out, len(update)]."""
    W = W.to(torch.float64)
    D = torch.zeros_like(W)
    P = torch.as_tensor(list(removed), dtype=torch.long, device=W.device)
    D[:, P] = W[:, P]
    if new_update is not None and len(update):
        U = torch.as_tensor(list(update), dtype=torch.long, device=W.device)
        D[:, U] = W[:, U] - new_update.to(torch.float64)
    S = torch.nonzero(D.abs().sum(0)).flatten()  # only the columns that change: H[S, S] instead of all of H
    D = D[:, S]
    return float(torch.einsum("oi,ij,oj->", D, H[S[:, None], S].to(torch.float64), D))

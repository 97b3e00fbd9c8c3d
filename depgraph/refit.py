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
``tr(W_G ([H^-1]_GG)^-1 W_G^T)`` (:func:`obs_costs`).

The output errors come from the solve itself (:class:`Refit`): with ``delta = W'_S - W_S`` and ``R = W_P H_PS`` the
error left is ``tr(W_P H_PP W_P^T) - tr(R delta^T) - lambda ||delta||^2``, a few products of [out, |S|] instead of
the [out, in] x [in, in] one that :func:`output_error` pays (seconds instead of a minute on a 7B ``down_proj``).

Everything runs in float64. Shapes: ``W`` [out, in], ``H`` [in, in], index lists into ``in``.
"""
from __future__ import annotations

import numpy as np
import torch

from dataclasses import dataclass

__all__ = ["Refit", "augment", "dampen", "refit", "refit_solve", "mean_fill", "obs_costs", "output_error"]


def augment(gram: torch.Tensor, total: torch.Tensor, count: int) -> torch.Tensor:
    """Gram matrix of ``[X, 1]``: ``[[X^T X, X^T 1], [1^T X, n]]`` [in + 1, in + 1] (the last column is the bias)."""
    n = gram.shape[0]
    out = torch.empty(n + 1, n + 1, dtype=torch.float64, device=gram.device)
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
    """One consumer's re-fit: ``new`` [out, len(update)] float64, and ``||W X^T - W' X^T||^2`` over the calibration
    tokens before (the removed columns zeroed, nothing re-fitted) and after."""

    new: torch.Tensor
    error_before: float
    error_after: float


def refit_solve(W: torch.Tensor, H: torch.Tensor, removed, update, damp: float = 0.01, undamped=()) -> Refit:
    """New values of the columns ``update`` of ``W`` [out, in] after the columns ``removed`` are deleted.

    ``W'_U = W_U + W_P H_PU (H_UU + lambda I)^-1`` with ``lambda = damp * mean(diag H_UU)`` on every updated
    column but those in ``undamped`` (a bias column). Columns neither removed nor updated keep their weights and
    need no term: they are the same before and after. The errors come from the solve (module docstring).
    """
    P = torch.as_tensor(list(removed), dtype=torch.long, device=H.device)
    U = torch.as_tensor(list(update), dtype=torch.long, device=H.device)
    W = W.to(torch.float64)
    H = H.to(torch.float64)
    W_P = W[:, P]
    before = float(torch.einsum("oi,ij,oj->", W_P, H[P][:, P], W_P)) if len(P) else 0.0
    if len(P) == 0 or len(U) == 0:
        return Refit(W[:, U].clone(), before, before)
    H_UU = H[U][:, U]  # a copy: dampened in place
    skip = set(undamped)
    lam_cols = torch.as_tensor([i for i, u in enumerate(U.tolist()) if u not in skip], dtype=torch.long,
                               device=H.device)
    lam = damp * float(H_UU[lam_cols, lam_cols].mean().clamp_min(1e-12)) if damp > 0 and len(lam_cols) else 0.0
    if lam:
        H_UU[lam_cols, lam_cols] += lam
    rhs = W_P @ H[P][:, U]  # [out, |U|]
    L, info = torch.linalg.cholesky_ex(H_UU)
    if int(info) == 0:
        delta = torch.cholesky_solve(rhs.T, L).T
        after = before - float((rhs * delta).sum()) - lam * float((delta[:, lam_cols] ** 2).sum())
        after = max(after, 0.0)
    else:  # singular even with dampening (dead inputs): the minimum-norm solution, its error measured directly
        delta = rhs @ torch.linalg.pinv(H_UU, hermitian=True)
        after = None
    new = W[:, U] + delta
    if after is None:
        after = output_error(W, H, removed, new, update)
    return Refit(new, before, after)


def refit(W: torch.Tensor, H: torch.Tensor, removed, update, damp: float = 0.01, undamped=()) -> torch.Tensor:
    """:func:`refit_solve`'s new columns only: ``[out, len(update)]`` float64."""
    return refit_solve(W, H, removed, update, damp, undamped).new


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
    return float(torch.einsum("oi,ij,oj->", D, H.to(torch.float64)[S][:, S], D))

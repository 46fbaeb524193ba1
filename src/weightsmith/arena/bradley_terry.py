"""Bradley–Terry strengths by maximum likelihood, for many data sets at once (a bootstrap).

The model (Bradley & Terry 1952, in the logistic form Chatbot Arena fits, Chiang et al. 2024
§4): P(i beats j) = σ(θ_i − θ_j). The data are pair tables: ``W[i, j]`` is what i scored
against j (a win 1, a tie or both-bad ½, as Chatbot Arena counts ties) and ``N[i, j]`` the
battles between them, so ``W[i, j] + W[j, i] = N[i, j]``. The log-likelihood

    ℓ(θ) = Σ_ij W_ij log σ(θ_i − θ_j)

is concave; its gradient is g_i = Σ_j W_ij − N_ij σ(θ_i − θ_j) and its negated Hessian the
graph Laplacian with weights N_ij p_ij (1 − p_ij). We maximise it by Newton's method with
backtracking, every data set of a batch at once (``(R, n, n)`` tables). θ + c fits as well
as θ: the gauge is fixed at mean 0 by adding 11ᵀ/n to the negated Hessian, which leaves the
step orthogonal to 1.

The maximum is finite and unique iff the directed graph "i scored against j" is strongly
connected (Zermelo 1929; Hunter 2004, Assumption 1). When it is not (one model won every
battle, or never won one), the maximum is at infinity; then the fit adds an L2 penalty
½λ‖θ‖² (λ = `FALLBACK_L2`) that keeps it finite, and the caller says so.

Not here: outcomes, the Elo-like scale, intervals and tables (ratings.py).
"""

from __future__ import annotations

import numpy as np

#: λ of the L2 penalty used when the plain maximum-likelihood strengths are infinite.
FALLBACK_L2 = 0.01
_MAX_ITER = 200
_TOL = 1e-10


def pair_tables(
    index_a: np.ndarray, index_b: np.ndarray, score_a: np.ndarray, n: int, counts: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(W, N) from battles ``index_a[k]`` vs ``index_b[k]`` where A scored ``score_a[k]``.

    `counts` ``(R, K)`` weighs each battle per data set (a bootstrap's resample counts); the
    tables are then ``(R, n, n)``, else ``(n, n)``."""
    single = counts is None
    c = np.ones((1, len(score_a))) if single else np.asarray(counts, dtype=float)
    rounds = c.shape[0]
    base = (np.arange(rounds) * n * n)[:, None]  # (R, 1): each data set's block
    ab, ba = base + index_a * n + index_b, base + index_b * n + index_a  # (R, K)
    size = rounds * n * n
    w = np.bincount(ab.ravel(), (c * score_a).ravel(), size) + np.bincount(
        ba.ravel(), (c * (1.0 - score_a)).ravel(), size
    )
    m = np.bincount(ab.ravel(), c.ravel(), size) + np.bincount(ba.ravel(), c.ravel(), size)
    w, m = w.reshape(rounds, n, n), m.reshape(rounds, n, n)
    return (w[0], m[0]) if single else (w, m)


def _closure(adjacent: np.ndarray) -> np.ndarray:
    """Reachability (…, n, n) of a directed graph, by repeated squaring."""
    n = adjacent.shape[-1]
    reach = (adjacent > 0) | np.eye(n, dtype=bool)
    for _ in range(max(1, int(np.ceil(np.log2(max(n, 2)))))):
        reach = (reach.astype(np.float64) @ reach.astype(np.float64)) > 0
    return reach


def strongly_connected(w: np.ndarray) -> np.ndarray:
    """Whether each table's "i scored against j" graph is strongly connected (the MLE is finite)."""
    return _closure(w).all(axis=(-2, -1))


def groups(n_table: np.ndarray) -> list[list[int]]:
    """The connected groups of models (indices) of one battle-count table ``(n, n)``."""
    reach = _closure(n_table + n_table.T)
    out: list[list[int]] = []
    seen: set[int] = set()
    for i in range(n_table.shape[0]):
        if i not in seen:
            members = [int(j) for j in np.nonzero(reach[i])[0]]
            seen.update(members)
            out.append(members)
    return out


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def _objective(theta: np.ndarray, w: np.ndarray, l2: np.ndarray) -> np.ndarray:
    """ℓ(θ) − ½λ‖θ‖² per data set: θ (R, n), w (R, n, n), l2 (R,)."""
    d = theta[:, :, None] - theta[:, None, :]  # (R, n, n)
    return (w * _log_sigmoid(d)).sum(axis=(1, 2)) - 0.5 * l2 * (theta**2).sum(-1)


def _newton_step(theta: np.ndarray, w: np.ndarray, m: np.ndarray, l2: np.ndarray) -> np.ndarray:
    """The Newton direction of each data set, gauge fixed at mean 0."""
    n = theta.shape[-1]
    p = np.exp(_log_sigmoid(theta[:, :, None] - theta[:, None, :]))  # (R, n, n): P(i beats j)
    grad = w.sum(-1) - (m * p).sum(-1) - l2[:, None] * theta  # (R, n)
    weight = m * p * (1.0 - p)
    eye = np.eye(n)
    neg_hess = eye * weight.sum(-1)[:, :, None] - weight + l2[:, None, None] * eye + 1.0 / n
    return np.linalg.solve(neg_hess, grad[..., None])[..., 0]


def fit_strengths(w: np.ndarray, m: np.ndarray, l2: float | np.ndarray = 0.0) -> np.ndarray:
    """Strengths θ (natural log, mean 0) maximising ℓ(θ) − ½λ‖θ‖², for tables (n, n) or (R, n, n).

    Every data set must be connected (or have λ > 0) and, for λ = 0, strongly connected; the
    caller checks (`groups`, `strongly_connected`) and picks λ."""
    single = np.ndim(w) == 2
    w = np.asarray(w, dtype=float)[None] if single else np.asarray(w, dtype=float)
    m = np.asarray(m, dtype=float)[None] if single else np.asarray(m, dtype=float)
    rounds, n = w.shape[0], w.shape[-1]
    lam = np.broadcast_to(np.asarray(l2, dtype=float), (rounds,)).copy()
    theta = np.zeros((rounds, n))
    active = np.arange(rounds)
    for _ in range(_MAX_ITER):
        t, wa, ma, la = theta[active], w[active], m[active], lam[active]
        step = _newton_step(t, wa, ma, la)
        base = _objective(t, wa, la)
        scale = np.ones(len(active))
        for _ in range(40):  # backtrack where a full step would lower the objective
            worse = _objective(t + scale[:, None] * step, wa, la) < base - 1e-12 * np.abs(base)
            if not worse.any():
                break
            scale[worse] *= 0.5
        theta[active] = t + scale[:, None] * step
        moved = np.abs(scale[:, None] * step).max(-1)
        active = active[moved > _TOL]
        if not len(active):
            break
    theta -= theta.mean(-1, keepdims=True)
    return theta[0] if single else theta

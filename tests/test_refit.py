"""The re-fit maths (depgraph.refit) against direct least-squares solves on plain tensors."""
import pytest
import torch

from depgraph.refit import augment, mean_fill, obs_costs, obs_select, output_error, refit, refit_solve


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    X += 0.5  # a non-zero mean, so the intercept matters
    W = torch.randn(5, 12, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    return X, W, b, [2, 7, 9]


def _kept(P, n=12):
    return [j for j in range(n) if j not in P]


def test_refit_equals_lstsq_and_never_worse(data):
    X, W, _, P = data
    S = _kept(P)
    H = X.T @ X
    new = refit(W, H, P, S, damp=0.0)
    ref = torch.linalg.lstsq(X[:, S], X @ W.T).solution.T
    assert torch.allclose(new, ref, atol=1e-5)
    before, after = output_error(W, H, P), output_error(W, H, P, new, S)
    assert after <= before
    direct = ((X @ W.T - X[:, S] @ new.T) ** 2).sum()
    assert after == pytest.approx(float(direct), rel=1e-8)
    assert before == pytest.approx(float(((X[:, P] @ W[:, P].T) ** 2).sum()), rel=1e-8)


@pytest.mark.parametrize("outputs", [2, 3, 5])
def test_dampened_refit_is_ridge_towards_the_old_weights(data, outputs):
    """Fewer outputs than removed columns (2: the solve against ``W_P H_PS``), as many (3) and more (5: the solve
    against ``H_SP``): both forms give the ridge least-squares fit and its exact error."""
    X, W, _, P = data
    W = W[:outputs]
    S = _kept(P)
    H = X.T @ X
    damp = 0.05
    lam = damp * float(torch.diagonal(H)[S].mean())
    fit = refit_solve(W, H, P, S, damp=damp)
    A = torch.cat([X[:, S], lam ** 0.5 * torch.eye(len(S), dtype=torch.float64)])
    B = torch.cat([X @ W.T, lam ** 0.5 * W[:, S].T])
    assert torch.allclose(fit.new, torch.linalg.lstsq(A, B).solution.T, atol=1e-8)
    assert fit.error_after == pytest.approx(output_error(W, H, P, fit.new, S), rel=1e-8)


def test_intercept_and_mean_only_case(data):
    X, W, b, P = data
    S = _kept(P)
    Ha = augment(X.T @ X, X.sum(0), X.shape[0])
    Wa = torch.cat([W, b[:, None]], 1)
    new = refit(Wa, Ha, P, S + [12], damp=0.0, undamped=(12,))
    ones = torch.ones(X.shape[0], 1, dtype=torch.float64)
    ref = torch.linalg.lstsq(torch.cat([X[:, S], ones], 1), X @ W.T + b).solution.T
    assert torch.allclose(new, ref, atol=1e-5)
    # the bias alone (FLAP): b + W_P mean(X_P), and it is the refit of the bias column only
    only_bias = refit(Wa, Ha, P, [12], damp=0.0, undamped=(12,))[:, 0]
    assert torch.allclose(only_bias, b + mean_fill(W, X.mean(0), P), atol=1e-8)
    assert torch.allclose(only_bias, b + X[:, P].mean(0) @ W[:, P].T, atol=1e-8)


def test_obs_cost_is_the_error_left_after_the_optimal_refit(data):
    X, W, _, _ = data
    H = X.T @ X
    heads = torch.arange(12) // 3  # 4 units of 3 columns
    for unit_of_index in (torch.arange(12), heads):
        costs = obs_costs(W, H, unit_of_index.numpy(), damp=0.0)
        for u in range(int(unit_of_index.max()) + 1):
            G = torch.nonzero(unit_of_index == u).flatten().tolist()
            S = _kept(G)
            err = output_error(W, H, G, refit(W, H, G, S, damp=0.0), S)
            assert costs[u] == pytest.approx(err, rel=1e-6)


@pytest.mark.parametrize("damp", [0.0, 0.05, 3.0])
def test_errors_from_the_solve_equal_the_direct_errors(data, damp):
    """refit_solve's closed-form errors (dampened, with an undamped bias column) are the measured ones."""
    X, W, b, P = data
    S = _kept(P)
    Ha = augment(X.T @ X, X.sum(0), X.shape[0])
    Wa = torch.cat([W, b[:, None]], 1)
    for update, undamped in ((S, ()), (S + [12], (12,)), ([12], (12,))):
        fit = refit_solve(Wa, Ha, P, update, damp=damp, undamped=undamped)
        assert torch.equal(fit.new, refit(Wa, Ha, P, update, damp=damp, undamped=undamped))
        assert fit.error_before == pytest.approx(output_error(Wa, Ha, P), rel=1e-9)
        assert fit.error_after == pytest.approx(output_error(Wa, Ha, P, fit.new, update), rel=1e-7, abs=1e-9)
        ones = torch.ones(X.shape[0], 1, dtype=torch.float64)
        Xa = torch.cat([X, ones], 1)
        kept = [j for j in range(13) if j not in P]
        Wn = Wa.clone()
        Wn[:, P] = 0
        Wn[:, update] = fit.new
        assert fit.error_after == pytest.approx(float(((Xa @ Wa.T - Xa[:, kept] @ Wn[:, kept].T) ** 2).sum()),
                                                rel=1e-7)


def test_obs_select_is_the_greedy_least_refit_error(data):
    """step=1: every round removes the unit whose removal, with all kept columns re-fitted, leaves the least output
    error given the units already removed (brute force over refit + output_error); neurons and 3-column heads."""
    X, W, _, _ = data
    H = X.T @ X
    heads = torch.arange(12) // 3
    for unit_of_index, count in ((torch.arange(12), 6), (heads, 2)):
        got = obs_select(W, H, unit_of_index.numpy(), count, damp=0.0)
        cols = {u: torch.nonzero(unit_of_index == u).flatten().tolist() for u in range(int(unit_of_index.max()) + 1)}
        gone = []
        for _ in range(count):
            def err(u):
                P = [c for v in gone + [u] for c in cols[v]]
                return output_error(W, H, P, refit(W, H, P, _kept(P), damp=0.0), _kept(P))
            gone.append(min((u for u in cols if u not in gone), key=err))
        assert got == gone
    assert got[0] == int(obs_costs(W, H, heads.numpy(), damp=0.0).argmin())
    with pytest.raises(ValueError, match="count"):
        obs_select(W, H, heads.numpy(), 4)


def test_obs_select_among_candidates_is_the_restricted_greedy(data):
    """candidates: only those units may go (the others stay and are re-fitted); each round still removes the
    candidate of least re-fit error given those already removed (brute force); too few candidates is refused."""
    X, W, _, _ = data
    H = X.T @ X
    allowed = [1, 4, 5, 8, 10, 11]
    got = obs_select(W, H, torch.arange(12).numpy(), 3, damp=0.0, candidates=allowed)
    gone = []
    for _ in range(3):
        def err(u):
            P = gone + [u]
            return output_error(W, H, P, refit(W, H, P, _kept(P), damp=0.0), _kept(P))
        gone.append(min((u for u in allowed if u not in gone), key=err))
    assert got == gone and set(got) <= set(allowed)
    assert got != obs_select(W, H, torch.arange(12).numpy(), 3, damp=0.0)  # the restriction changes the choice
    with pytest.raises(ValueError, match="candidates"):
        obs_select(W, H, torch.arange(12).numpy(), 3, candidates=[1, 2])


def test_a_float32_gram_matrix_gives_the_float64_fit_in_either_solve_dtype(data):
    """H accumulated in float32 (half-precision blocks), read in gathered float64 blocks or solved in float32 (what
    half-precision blocks get): the fit and its errors agree with the float64 solve to float32's precision, the
    result comes in the solve's dtype, and the float32 input is not modified."""
    X, W, b, P = data
    S = _kept(P)
    Ha = augment(X.T @ X, X.sum(0), X.shape[0])
    H32 = Ha.float()
    kept32 = H32.clone()
    Wa = torch.cat([W, b[:, None]], 1)
    for update, undamped in ((S, ()), (S + [12], (12,))):
        ref = refit_solve(Wa, Ha, P, update, damp=0.01, undamped=undamped)
        for dtype in (torch.float64, torch.float32):
            fit = refit_solve(Wa.to(dtype), H32, P, update, damp=0.01, undamped=undamped, dtype=dtype)
            assert fit.new.dtype == dtype
            assert torch.allclose(fit.new.double(), ref.new, rtol=1e-4, atol=1e-4)
            assert fit.error_before == pytest.approx(ref.error_before, rel=1e-5)
            assert fit.error_after == pytest.approx(ref.error_after, rel=1e-3, abs=1e-5)
    assert torch.equal(H32, kept32)
    assert augment(X.T.float() @ X.float(), X.sum(0).float(), X.shape[0]).dtype == torch.float32


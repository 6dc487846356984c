"""seqbook.kalman against the exact answers: the posterior of the whole problem
solved as one Gaussian linear system, the dense joint density of the measurements,
and known χ² quantiles."""

import math

import pytest
import torch

from seqbook import kalman as K

F64 = torch.float64


def random_model(n=3, m=2, *, seed=0, batch=None):
    g = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)

    def spd(k):
        A = torch.randn(*lead, k, k, dtype=F64, generator=g)
        return A @ A.mT + 0.3 * torch.eye(k, dtype=F64)

    F = torch.randn(*lead, n, n, dtype=F64, generator=g)
    F = 0.95 * F / torch.linalg.matrix_norm(F, ord=2, keepdim=True)   # stable dynamics
    H = torch.randn(*lead, m, n, dtype=F64, generator=g)
    x0 = torch.randn(*lead, n, dtype=F64, generator=g)
    return dict(F=F, H=H, Q=spd(n), R=spd(m), x0=x0, P0=spd(n)), g


def measurements(model, g, batch, length, missing=()):
    _, z = K.simulate(**model, length=length, batch=batch, generator=g)
    for b, t in missing:
        z[b, t] = float("nan")
    return z


def test_filter_equals_exact_posterior_of_the_batch_problem():
    model, g = random_model()
    z = measurements(model, g, batch=4, length=12, missing=[(1, 3), (2, 0), (3, 11)])
    result = K.kalman_filter(z, **model)
    for t in range(1, z.shape[1] + 1):
        mean, cov = K.batch_posterior(z[:, :t], **model)
        torch.testing.assert_close(result.x[:, t - 1], mean[:, -1], rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(result.P[:, t - 1], cov[:, -1], rtol=1e-8, atol=1e-10)


def test_smoother_equals_batch_marginals():
    model, g = random_model(n=4, m=2, seed=1)
    z = measurements(model, g, batch=3, length=15, missing=[(0, 7), (2, 14)])
    smooth = K.rts_smoother(K.kalman_filter(z, **model), model["F"])
    mean, cov = K.batch_posterior(z, **model)
    torch.testing.assert_close(smooth.x, mean, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(smooth.P, cov, rtol=1e-8, atol=1e-10)


def test_rts_step_is_one_step_of_the_smoother():
    model, g = random_model(seed=2)
    z = measurements(model, g, batch=2, length=6)
    f = K.kalman_filter(z, **model)
    s = K.rts_smoother(f, model["F"])
    t = 3
    x_s, P_s = K.rts_step(f.x[:, t], f.P[:, t], f.x_pred[:, t + 1], f.P_pred[:, t + 1],
                          s.x[:, t + 1], s.P[:, t + 1], model["F"])
    torch.testing.assert_close(x_s, s.x[:, t])
    torch.testing.assert_close(P_s, s.P[:, t])


@pytest.mark.parametrize("length", [1, 7, 33])
@pytest.mark.parametrize("with_missing", [False, True])
def test_parallel_filter_equals_sequential(length, with_missing):
    model, g = random_model(n=3, m=2, seed=length)
    missing = [(0, length // 2), (2, length - 1), (1, 0)] if with_missing else []
    z = measurements(model, g, batch=3, length=length, missing=missing)
    x, P = K.parallel_kalman_filter(z, **model)
    result = K.kalman_filter(z, **model)
    torch.testing.assert_close(x, result.x, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(P, result.P, rtol=1e-8, atol=1e-10)


def test_log_likelihood_equals_dense_joint_density():
    model, g = random_model(n=2, m=2, seed=3)
    T = 6
    z = measurements(model, g, batch=2, length=T)
    F, H, Q, R, x0, P0 = (model[k] for k in ("F", "H", "Q", "R", "x0", "P0"))
    # z_1..z_T is jointly Gaussian with mean H F^t x0; build its covariance block by block.
    n = F.shape[0]
    means, covs = [], [P0]
    x = x0
    for _ in range(T):
        x = F @ x
        means.append(H @ x)
        covs.append(F @ covs[-1] @ F.T + Q)
    covs = covs[1:]
    def block(s, t):   # Cov(z_s, z_t) = H Cov(x_s) (F^{t-s})^T H^T for t >= s
        if t < s:
            return block(t, s).T
        return H @ covs[s] @ torch.linalg.matrix_power(F, t - s).T @ H.T + (R if s == t else 0)

    blocks = [[block(s, t) for t in range(T)] for s in range(T)]
    cov = torch.cat([torch.cat(row, 1) for row in blocks], 0)
    density = torch.distributions.MultivariateNormal(torch.cat(means), covariance_matrix=cov)
    expected = density.log_prob(z.reshape(2, -1))
    torch.testing.assert_close(K.kalman_filter(z, **model).log_likelihood, expected, rtol=1e-8, atol=1e-8)
    assert n == 2


def test_covariances_stay_symmetric_psd_over_ten_thousand_steps():
    # Badly conditioned noise: process noise spanning twelve orders of magnitude and a
    # near-perfect sensor, so the update subtracts nearly equal matrices at every step.
    n, m, T = 4, 2, 10_000
    g = torch.Generator().manual_seed(4)
    V = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=g))[0]
    Q = V @ torch.diag(torch.tensor([1e-9, 1e-5, 1e-1, 1e3], dtype=F64)) @ V.T
    R = 1e-8 * torch.eye(m, dtype=F64)
    F = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=g))[0]      # orthogonal: neither grows nor decays
    H = torch.randn(m, n, dtype=F64, generator=g)
    x0, P0 = torch.zeros(n, dtype=F64), torch.eye(n, dtype=F64)
    z = torch.randn(2, T, m, dtype=F64, generator=g)
    P = K.kalman_filter(z, F, H, Q, R, x0, P0).P
    assert torch.isfinite(P).all()
    torch.testing.assert_close(P, P.mT, rtol=0, atol=0)
    smallest = torch.linalg.eigvalsh(P).amin()
    largest = torch.linalg.eigvalsh(P).amax()
    assert smallest >= -1e-12 * largest, f"P lost positive semi-definiteness: {smallest.item():.3e}"


def test_missing_measurement_is_a_pure_prediction():
    model, g = random_model(seed=5)
    z = measurements(model, g, batch=2, length=5, missing=[(0, 2)])
    r = K.kalman_filter(z, **model)
    torch.testing.assert_close(r.x[0, 2], r.x_pred[0, 2], rtol=0, atol=0)
    torch.testing.assert_close(r.P[0, 2], r.P_pred[0, 2], rtol=0, atol=0)
    assert torch.isnan(r.innovation[0, 2]).all() and not torch.isnan(r.innovation[1, 2]).any()
    assert torch.isfinite(r.x).all() and torch.isfinite(r.P).all() and torch.isfinite(r.log_likelihood).all()


def test_fully_missing_sequence_is_repeated_prediction():
    model, _ = random_model(seed=6)
    z = torch.full((1, 8, 2), float("nan"), dtype=F64)
    r = K.kalman_filter(z, **model)
    x, P = model["x0"], model["P0"]
    for t in range(8):
        x, P = K.predict(x, P, model["F"], model["Q"])
        torch.testing.assert_close(r.x[0, t], x)
        torch.testing.assert_close(r.P[0, t], P)
    assert r.log_likelihood.item() == 0.0


def test_gradients_flow_through_missing_measurements():
    model, g = random_model(seed=7)
    z = measurements(model, g, batch=2, length=6, missing=[(0, 1), (1, 4)])
    R = model.pop("R").clone().requires_grad_()
    K.kalman_filter(z, R=R, **model).log_likelihood.sum().backward()
    assert torch.isfinite(R.grad).all() and R.grad.abs().sum() > 0


def test_batched_model_equals_shared_model():
    model, g = random_model(seed=8)
    z = measurements(model, g, batch=3, length=7)
    batched = {k: v.expand(3, *v.shape).clone() for k, v in model.items()}
    a, b = K.kalman_filter(z, **model), K.kalman_filter(z, **batched)
    torch.testing.assert_close(a.x, b.x)
    torch.testing.assert_close(a.P, b.P)
    # and per-track models are really per track: track 0 filtered alone gives the same answer
    single = K.kalman_filter(z[:1], **{k: v[:1] for k, v in batched.items()})
    torch.testing.assert_close(single.x[0], a.x[0])


def test_float32_agrees_with_float64():
    model, g = random_model(seed=9)
    z = measurements(model, g, batch=2, length=20)
    r64 = K.kalman_filter(z, **model)
    r32 = K.kalman_filter(z.float(), **{k: v.float() for k, v in model.items()})
    torch.testing.assert_close(r32.x.double(), r64.x, rtol=1e-4, atol=1e-4)


def test_chi2_interval_matches_known_quantiles():
    lo, hi = K.chi2_interval(2, 0.95)
    assert math.isclose(lo, 0.0506356, rel_tol=1e-5) and math.isclose(hi, 7.3777589, rel_tol=1e-6)
    lo, hi = K.chi2_interval(2, 0.95, samples=50)         # χ²(100)/50: quantiles 74.2219, 129.5612
    assert math.isclose(lo, 74.2219 / 50, rel_tol=1e-5) and math.isclose(hi, 129.5612 / 50, rel_tol=1e-5)


def test_nis_separates_a_tuned_filter_from_a_mistuned_one():
    cv = K.constant_velocity(dt=0.1, q=1.0, r=0.25)
    x0, P0 = torch.zeros(4, dtype=F64), torch.eye(4, dtype=F64)
    g = torch.Generator().manual_seed(10)
    runs, T = 50, 100
    x_true, z = K.simulate(cv["F"], cv["H"], cv["Q"], cv["R"], x0, P0, T, batch=runs, generator=g)
    lo, hi = K.chi2_interval(2, 0.95, samples=runs)

    def mean_nis(R):
        r = K.kalman_filter(z, cv["F"], cv["H"], cv["Q"], R, x0, P0)
        return K.nis(r.innovation, r.S).mean(0)            # average over runs, per step

    tuned, pessimistic = mean_nis(cv["R"]), mean_nis(100 * cv["R"])
    assert ((tuned > lo) & (tuned < hi)).float().mean() > 0.9
    assert ((pessimistic > lo) & (pessimistic < hi)).float().mean() < 0.1
    r = K.kalman_filter(z, cv["F"], cv["H"], cv["Q"], cv["R"], x0, P0)
    lo_n, hi_n = K.chi2_interval(4, 0.95, samples=runs)
    nees = K.nees(x_true, r.x, r.P).mean(0)
    assert ((nees > lo_n) & (nees < hi_n)).float().mean() > 0.9


@pytest.mark.parametrize("change, message", [
    (dict(R=torch.eye(3, dtype=F64)), r"R must be \(m, m\) = \(2, 2\)"),
    (dict(F=torch.eye(3, 2, dtype=F64)), r"F must be \(n, n\)"),
    (dict(H=torch.ones(2, 4, dtype=F64)), r"H must be \(m, n\) = \(2, 3\)"),
    (dict(x0=torch.zeros(4, dtype=F64)), r"x0 must be \(n,\) = \(3,\)"),
    (dict(Q=torch.tensor([[1.0, 0.5, 0], [0, 1, 0], [0, 0, 1]], dtype=F64)), "Q must be symmetric"),
    (dict(R=torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=F64)), "R must be positive semi-definite"),
    (dict(P0=-torch.eye(3, dtype=F64)), "P0 must be positive semi-definite"),
    (dict(Q=torch.eye(3, dtype=torch.float32)), "Q has dtype torch.float32 but z has torch.float64"),
    (dict(Q=torch.eye(3, dtype=F64).expand(5, 3, 3)), r"Q must be .* with batch = 2"),
])
def test_bad_input_names_the_argument(change, message):
    model, g = random_model()
    z = measurements(model, g, batch=2, length=3)
    with pytest.raises((ValueError, TypeError), match=message):
        K.kalman_filter(z, **{**model, **change})


def test_measurements_must_be_three_dimensional():
    model, _ = random_model()
    with pytest.raises(ValueError, match=r"z must be \(batch, length, m\)"):
        K.kalman_filter(torch.zeros(5, 2, dtype=F64), **model)

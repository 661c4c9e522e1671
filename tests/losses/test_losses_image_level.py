"""CCNN constrained posterior: KKT conditions, scipy solvers, the gradient (q - p)/N."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from jaxseg.losses import constrained_posterior, image_level_loss
from jaxseg.losses import image_level



@functools.lru_cache(maxsize=None)
def _jitted(fn, **kwargs):
  return jax.jit(functools.partial(fn, **kwargs))


def _posterior(logits, tags, large=None, **kwargs):
  """constrained_posterior, compiled once per keyword set (eager dispatch is slow)."""
  fn = _jitted(constrained_posterior, size_constraint=large is not None, **kwargs)
  return fn(logits, tags) if large is None else fn(logits, tags, large=large)


def _loss(logits, batch, **kwargs):
  return _jitted(image_level_loss, **kwargs)(logits, batch)


def _rows(tags, c, fg_lower=0.05, bg_lower=0.3, bg_upper=0.7, fg_slack=2.0):
  """NumPy constraint rows for one image: list of (a [C], b, cap) for the active rows."""
  rows = []
  present = tags > 0.5
  for k in range(c):
    if present[k]:
      rows.append((np.eye(c)[k], bg_lower if k == 0 else fg_lower, np.inf if k == 0 else fg_slack,
                   k))
  if present[0] and present[1:].any():
    rows.append((-np.eye(c)[0], -bg_upper, np.inf, c))
  return rows


def _scipy_dual(f, tags, beta=1.0, **kw):
  """Minimise the dual with L-BFGS-B in float64; returns (mu [C+1], P [P,C])."""
  p_, c = f.shape
  rows = _rows(tags, c, **kw)
  fm = np.where(tags > 0.5, f.astype(np.float64), -1e9)
  a = np.stack([r[0] for r in rows])
  b = np.array([r[1] for r in rows])

  def g(mu):
    z = beta * (fm + mu @ a)
    m = z.max(1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(1))
    p = np.exp(z - lse[:, None])
    return lse.mean() / beta - mu @ b, a @ p.mean(0) - b

  res = optimize.minimize(g, np.zeros(len(rows)), jac=True, method="L-BFGS-B",
                          bounds=[(0, None if np.isinf(r[2]) else r[2]) for r in rows],
                          options=dict(ftol=1e-15, gtol=1e-12, maxiter=10000))
  mu = np.zeros(c + 1)
  for value, r in zip(res.x, rows):
    mu[r[3]] = value
  z = beta * (fm + res.x @ a)
  p = np.exp(z - z.max(1, keepdims=True))
  return mu, p / p.sum(1, keepdims=True)


def _random_case(seed, n=2, size=6, c=4):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, 2, (n, size, size, c)).astype(np.float32)
  logits[..., 0] += rng.normal(0, 2, (n, 1, 1))  # vary how much background Q holds
  tags = (rng.random((n, c)) > 0.4).astype(np.float32)
  tags[:, 0] = 1.0
  return logits, tags


@pytest.mark.parametrize("solver", ["newton", "pgd"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dual_solution_agrees_with_scipy(solver, seed):
  logits, tags = _random_case(seed)
  p, mu = _posterior(logits, tags, solver=solver)
  tol = 2e-3 if solver == "newton" else 2e-2
  for i in range(len(logits)):
    mu_ref, p_ref = _scipy_dual(logits[i].reshape(-1, 4), tags[i])
    np.testing.assert_allclose(np.asarray(mu[i]), mu_ref, atol=tol)
    np.testing.assert_allclose(np.asarray(p[i]).reshape(-1, 4), p_ref, atol=tol)


@pytest.mark.parametrize("solver", ["newton", "pgd"])
def test_hardness_agrees_with_scipy(solver):
  """P = softmax(beta (f + A^T mu)): sharper posteriors, same constraints."""
  logits, tags = _random_case(7)
  p, mu = _posterior(logits, tags, solver=solver, hardness=3.0)
  tol = 2e-3 if solver == "newton" else 2e-2
  for i in range(len(logits)):
    mu_ref, p_ref = _scipy_dual(logits[i].reshape(-1, 4), tags[i], beta=3.0)
    np.testing.assert_allclose(np.asarray(mu[i]), mu_ref, atol=tol)
    np.testing.assert_allclose(np.asarray(p[i]).reshape(-1, 4), p_ref, atol=tol)
  p_soft, _ = _posterior(logits, tags, solver=solver)
  entropy = lambda x: float(-np.sum(np.asarray(x) * np.log(np.maximum(np.asarray(x), 1e-12))))
  assert entropy(p) < 0.7 * entropy(p_soft)


@pytest.mark.parametrize("solver", ["newton", "pgd"])
def test_hard_posterior_meets_the_constraints(solver):
  """CCNN's size-mode hardness (1000): a near one-hot P whose class fractions obey the rows."""
  for seed in range(3):
    logits, tags = _random_case(30 + seed, n=2, size=10, c=4)
    p, mu = _posterior(logits, tags, solver=solver, hardness=1000.0,
                       iterations=60 if solver == "newton" else 600)
    p, mu = np.asarray(p), np.asarray(mu)
    assert np.all(np.isfinite(p)) and np.all(np.isfinite(mu))
    assert np.mean(p.max(-1) > 0.99) > 0.95
    for i in range(2):
      mean_p = p[i].reshape(-1, 4).mean(0)
      for a, b, cap, row in _rows(tags[i], 4):
        # One pixel of 100 is the resolution of a hard assignment.
        assert mean_p @ a - b >= -0.011 or mu[i, row] >= cap - 1e-3, (seed, i, row, mean_p)


def test_primal_agrees_with_slsqp():
  """The KL projection with slack solved directly in the primal on a tiny image."""
  rng = np.random.default_rng(5)
  c, npix = 3, 4
  f = rng.normal(0, 1, (npix, c))
  f[:, 2] += 3.0  # class 2 dominates, so class 1's lower bound binds
  f[:, 0] -= 1.0
  tags = np.ones(c)
  q = np.exp(f - f.max(1, keepdims=True))
  q /= q.sum(1, keepdims=True)
  rows = _rows(tags, c)
  m = len(rows)

  def objective(x):
    p = x[:npix * c].reshape(npix, c)
    xi = x[npix * c:]
    kl = np.sum(p * (np.log(np.maximum(p, 1e-12)) - np.log(q))) / npix
    return kl + sum(0 if np.isinf(r[2]) else r[2] * s for r, s in zip(rows, xi))

  cons = [{"type": "eq", "fun": lambda x: x[:npix * c].reshape(npix, c).sum(1) - 1}]
  for j, r in enumerate(rows):
    cons.append({"type": "ineq", "fun": lambda x, r=r, j=j: (
        x[:npix * c].reshape(npix, c).mean(0) @ r[0] - r[1] + x[npix * c + j])})
  bounds = [(1e-9, 1)] * (npix * c) + [(0, 0 if np.isinf(r[2]) else None) for r in rows]
  res = optimize.minimize(objective, np.concatenate([q.ravel(), np.zeros(m)]), method="SLSQP",
                          bounds=bounds, constraints=cons, options=dict(ftol=1e-12, maxiter=1000))
  assert res.success
  p, _ = _posterior(f[None, None].astype(np.float32), tags[None].astype(np.float32))
  np.testing.assert_allclose(np.asarray(p)[0, 0], res.x[:npix * c].reshape(npix, c), atol=2e-3)


def test_q_satisfying_the_constraints_is_its_own_posterior():
  rng = np.random.default_rng(3)
  logits = rng.normal(0, 0.3, (1, 8, 8, 4)).astype(np.float32)
  logits[..., 0] += 1.0      # background about half
  logits[..., 3] -= 30.0     # absent class has no mass
  tags = np.array([[1, 1, 1, 0]], np.float32)
  q = jax.nn.softmax(logits, -1)
  assert 0.3 < float(q[..., 0].mean()) < 0.7 and float(q[..., 1:3].mean((0, 1, 2)).min()) > 0.05
  p, mu = _posterior(logits, tags)
  np.testing.assert_allclose(np.asarray(mu), 0.0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(p), np.asarray(q), atol=1e-6)
  assert float(_loss(logits, {"tags": tags}, downscale=1)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("solver", ["newton", "pgd"])
def test_kkt_conditions(solver):
  for seed in range(4):
    logits, tags = _random_case(10 + seed, n=3, size=8, c=5)
    p, mu = _posterior(logits, tags, solver=solver)
    p, mu = np.asarray(p), np.asarray(mu)
    tol = 1e-3 if solver == "newton" else 5e-3
    for i in range(3):
      assert np.all(p[i][..., tags[i] < 0.5] == 0.0)
      mean_p = p[i].reshape(-1, 5).mean(0)
      for a, b, cap, row in _rows(tags[i], 5):
        slack = mean_p @ a - b
        assert slack >= -tol or mu[i, row] >= cap - tol, (seed, i, row, slack, mu[i, row])
        assert mu[i, row] >= 0.0 and mu[i, row] <= cap + 1e-6
        if mu[i, row] > 0.05 and mu[i, row] < cap - 0.05:
          assert abs(slack) < tol  # complementary slackness
      inactive = [r for r in range(6) if r not in [x[3] for x in _rows(tags[i], 5)]]
      assert np.all(mu[i, inactive] == 0.0)


def test_gradient_is_q_minus_p_over_n():
  logits, tags = _random_case(20, n=2, size=5, c=4)
  grad = _jitted(jax.grad(functools.partial(image_level_loss, downscale=1)))(
      jnp.asarray(logits), {"tags": tags})
  p, _ = _posterior(logits, tags)
  q = jax.nn.softmax(logits, -1)
  np.testing.assert_allclose(grad, (q - p) / (25 * 2), atol=1e-7)


def test_loss_is_the_kl_divergence_and_slack_caps_the_bias():
  logits, tags = _random_case(21, n=1, size=6, c=4)
  logits[..., 1] -= 20.0  # class 1 tagged but nearly absent from Q: its bias hits the cap
  tags[:, 1] = 1.0
  p, mu = _posterior(logits, tags)
  assert float(mu[0, 1]) == pytest.approx(2.0, abs=1e-5)
  q = np.asarray(jax.nn.softmax(logits, -1), np.float64)
  pn = np.asarray(p, np.float64)
  kl = np.sum(np.where(pn > 0, pn * (np.log(np.maximum(pn, 1e-30)) - np.log(q)), 0), -1).mean()
  assert float(_loss(logits, {"tags": tags}, downscale=1)) == pytest.approx(kl, rel=1e-4)


def test_downscale_pools_logits_over_valid_pixels():
  logits, tags = _random_case(22, n=2, size=8, c=4)
  pooled = logits.reshape(2, 4, 2, 4, 2, 4).mean((2, 4))
  a = _loss(logits, {"tags": tags}, downscale=2)
  b = _loss(pooled, {"tags": tags}, downscale=1)
  assert float(a) == pytest.approx(float(b), rel=1e-5)
  valid = np.ones((2, 8, 8), bool)
  valid[:, :, 6:] = False
  pooled_v, cell_valid = image_level.pool_logits(jnp.asarray(logits),
                                                 jnp.asarray(valid, jnp.float32), 4)
  np.testing.assert_allclose(pooled_v[:, 0, 1], logits[:, 0:4, 4:6].mean((1, 2)), rtol=1e-5)
  assert bool(jnp.all(cell_valid == 1))


def test_size_constraint_and_no_background_class():
  logits, tags = _random_case(23, n=1, size=6, c=4)
  tags[:] = [[1, 1, 1, 0]]
  logits[..., 2] -= 3.0
  large = np.array([[0, 0, 1, 0]], np.float32)
  p, mu = _posterior(logits, tags, large=large)
  assert float(np.asarray(p)[..., 2].mean()) >= 0.1 - 1e-3  # hard: no slack cap
  assert float(np.asarray(p)[..., 0].mean()) >= 0.2 - 1e-3
  loss = _loss(logits, {"tags": tags, "tags_large": large}, size_constraint=True, downscale=1)
  assert np.isfinite(float(loss))
  p, mu = _posterior(logits, tags, background_class=None)
  assert float(mu[0, 4]) == 0.0  # no background upper row
  mean_p = np.asarray(p)[0].reshape(-1, 4).mean(0)
  for k in range(3):  # every tagged class is a foreground class with the slack cap
    assert mean_p[k] >= 0.05 - 1e-3 or float(mu[0, k]) == pytest.approx(2.0, abs=1e-5)
  assert float(mu[0, 2]) == pytest.approx(2.0, abs=1e-5)


def test_untagged_image_is_unconstrained():
  logits, _ = _random_case(24, n=1, size=4, c=3)
  p, mu = _posterior(logits, np.zeros((1, 3), np.float32))
  np.testing.assert_allclose(np.asarray(p), np.asarray(jax.nn.softmax(logits, -1)), atol=1e-6)


def test_bad_inputs():
  logits = np.zeros((1, 4, 4, 3), np.float32)
  with pytest.raises(ValueError, match=r"needs batch\['tags'\]"):
    image_level_loss(logits, {})
  with pytest.raises(ValueError, match="tags"):
    image_level_loss(logits, {"tags": np.ones((1, 4), np.float32)})
  with pytest.raises(ValueError, match="unknown solver"):
    image_level_loss(logits, {"tags": np.ones((1, 3), np.float32)}, solver="lbfgs")
  with pytest.raises(ValueError, match="tags_large"):
    image_level_loss(logits, {"tags": np.ones((1, 3), np.float32)}, size_constraint=True)
  with pytest.raises(ValueError, match="downscale"):
    image_level_loss(logits, {"tags": np.ones((1, 3), np.float32)}, downscale=0)
  with pytest.raises(ValueError, match="hardness"):
    image_level_loss(logits, {"tags": np.ones((1, 3), np.float32)}, hardness=0.0)
  with pytest.raises(ValueError, match="bg_lower"):
    constrained_posterior(logits, np.ones((1, 3), np.float32), bg_lower=0.8)


# ----------------------------------------------------------------------------------------------
# EM-Adapt.


@pytest.mark.parametrize("seed", range(4))
def test_em_adapt_gives_every_tagged_class_its_portion(seed):
  rng = np.random.default_rng(seed)
  n, h, w, c = 2, 12, 14, 5
  logits = rng.normal(0, 1, (n, h, w, c)).astype(np.float32)
  logits[..., seed % c] += 6.0  # the network calls everything one class (maybe untagged)
  tags = np.array([[1, 1, 0, 1, 1], [1, 0, 1, 0, 0]], np.float32)
  portion = (0.2, 0.25)[seed % 2]  # 0.25: four tagged classes fill the image exactly
  labels = np.asarray(_jitted(image_level.em_adapt_targets, bg_portion=portion,
                              fg_portion=portion)(logits, tags))
  k = int(np.floor(portion * h * w))
  for i in range(n):
    for cls in range(c):
      if tags[i, cls]:
        assert np.sum(labels[i] == cls) >= k, (i, cls)
      else:
        assert not np.any(labels[i] == cls)  # untagged classes never win


def test_em_adapt_valid_pixels_and_untagged_images():
  rng = np.random.default_rng(5)
  logits = rng.normal(0, 1, (2, 8, 8, 3)).astype(np.float32)
  logits[..., 0] += 5.0
  tags = np.array([[1, 0, 1], [0, 0, 0]], np.float32)
  valid = np.ones((2, 8, 8), bool)
  valid[0, 6:] = False
  labels = np.asarray(_jitted(image_level.em_adapt_targets, fg_portion=0.5)(logits, tags, valid))
  assert np.all(labels[0][~valid[0]] == 255) and np.all(labels[1] == 255)  # no target
  assert np.sum(labels[0] == 2) >= 24  # floor(0.5 * 48 valid pixels)
  # No background class: every tagged class takes fg_portion and the order starts at 0.
  labels = np.asarray(_jitted(image_level.em_adapt_targets, fg_portion=0.4,
                              background_class=None)(logits, tags))
  assert np.sum(labels[0] == 0) >= 25 and np.sum(labels[0] == 2) >= 25


def test_em_adapt_loss_is_cross_entropy_on_its_targets():
  rng = np.random.default_rng(6)
  logits = rng.normal(0, 1, (2, 8, 8, 3)).astype(np.float32)
  tags = np.array([[1, 1, 0], [1, 0, 1]], np.float32)
  batch = {"tags": tags}
  labels = np.asarray(_jitted(image_level.em_adapt_targets)(logits, tags))
  logp = np.asarray(jax.nn.log_softmax(logits.astype(np.float64), -1))
  expected = -np.mean(np.take_along_axis(logp, labels[..., None], -1))
  fn = _jitted(image_level_loss, mode="em_adapt", downscale=1)
  assert float(fn(logits, batch)) == pytest.approx(expected, rel=1e-5)
  grad = jax.grad(fn)(jnp.asarray(logits), batch)
  np.testing.assert_allclose(grad, (np.exp(logp) - np.eye(3)[labels]) / labels.size, atol=1e-6)
  # Pooled: the E-step and the cross-entropy are on the downscale x downscale cells.
  pooled, _ = image_level.pool_logits(jnp.asarray(logits), jnp.ones((2, 8, 8)), 4)
  pooled_labels = _jitted(image_level.em_adapt_targets)(pooled, tags)
  logq = np.asarray(jax.nn.log_softmax(pooled, -1))
  expected = -np.mean(np.take_along_axis(logq, np.asarray(pooled_labels)[..., None], -1))
  got = float(_jitted(image_level_loss, mode="em_adapt", downscale=4)(logits, batch))
  assert got == pytest.approx(expected, rel=1e-5)


def test_em_adapt_bad_inputs():
  logits = np.zeros((1, 4, 4, 3), np.float32)
  tags = np.ones((1, 3), np.float32)
  with pytest.raises(ValueError, match="unknown mode 'em_fixed'"):
    image_level_loss(logits, {"tags": tags}, mode="em_fixed")
  with pytest.raises(ValueError, match="fg_portion must be in"):
    image_level_loss(logits, {"tags": tags}, mode="em_adapt", fg_portion=1.5)
  with pytest.raises(ValueError, match=r"tags must be \[N,C\]"):
    image_level.em_adapt_targets(logits, np.ones((1, 4), np.float32))

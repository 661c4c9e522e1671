"""Image-level tags: CCNN's constrained-posterior loss (Pathak et al., ICCV 2015).

Per image with class scores f_i (pixels i = 1..N, Q_i = softmax(f_i)) and tags z, CCNN finds
the latent distribution P closest to Q,

    min_P (1/N) sum_i KL(P_i || Q_i)   s.t.   (1/N) sum_i a_c^T P_i >= b_c - xi_c,  xi_c >= 0,

with a linear penalty ``cap_c * xi_c`` on the slack (a hard constraint has cap = inf), and
trains the network on KL(P || Q) with P fixed. The constraints (``C`` lower-bound rows, one per
class, and one background upper-bound row, so at most C + 1):

| row | active when | constraint | cap |
|---|---|---|---|
| present foreground class l | tag l on | mean P(l) >= ``fg_lower`` (0.05) | ``fg_slack`` (2) |
| background lower | tag 0 on | mean P(0) >= ``bg_lower`` (0.3) | inf |
| background upper | tag 0 and some fg on | -mean P(0) >= -``bg_upper`` (-0.7) | inf |
| absent class l | tag l off | P(l) = 0 (the class is removed) | -- |

With ``size_constraint=True`` (CCNN's size mode; ``batch["tags_large"]`` marks classes that
cover more than 10% of the image): bg lower is ``size_bg_lower`` (0.2) and large classes get
the hard lower bound ``size_fg_lower`` (0.1). (The released code uses the size indicator as the
label set, so present-but-small classes get a zero constraint there; here they keep their
ordinary ``fg_lower`` row.)

The solution is ``P_i = softmax(beta (f_i + A^T mu))`` where the multipliers ``mu`` (one per
row, in logit units: the bias a row adds to its class's logits; CCNN's lambda = N * mu)
minimise the convex dual

    g(mu) = (1/(beta N)) sum_i logsumexp(beta (f_i + A^T mu)) - mu^T b,   0 <= mu_c <= cap_c,

with gradient ``A mean_i P_i - b`` and Hessian ``beta A Cov_i(P_i) A^T`` ((C+1) x (C+1)).
``beta`` is CCNN's hardness (``hardness``): 1 is the KL projection above; CCNN's size mode
uses 1000, which makes P a near one-hot labelling whose class fractions meet the rows (the
projection of Q onto the constraints with an entropy penalty scaled by 1/beta). Two
jit-compatible solvers run a fixed number of iterations inside ``lax.fori_loop``:
``"newton"`` (projected Newton on the free rows, the step picked among 12 halvings and 12
projected-gradient steps by the dual value) and ``"pgd"`` (CCNN's projected gradient descent:
accept a step if g decreases and grow it by 1.1, else halve it).
"""
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from jaxseg.losses import _common

_NEG = -1e9
_NEWTON_STEPS = tuple(0.5 ** k for k in range(12))
_GRADIENT_STEPS = tuple(8.0 * 0.5 ** k for k in range(12))


def _pool(x, factor):
  """Sum-pool [N,H,W,K] by ``factor`` (zero-padded at the bottom/right)."""
  n, h, w, k = x.shape
  ph, pw = -(-h // factor) * factor, -(-w // factor) * factor
  x = jnp.pad(x, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)))
  return x.reshape(n, ph // factor, factor, pw // factor, factor, k).sum(axis=(2, 4))


def pool_logits(logits, valid, factor: int):
  """Average logits over ``factor`` x ``factor`` cells, counting valid pixels only.

  Returns (pooled logits [N,h,w,C], pooled validity float32 [N,h,w]); a cell is valid if any
  of its pixels is. Cells are anchored at the top-left, so padding added at the bottom/right
  (which ``valid`` marks) never changes the cells of the real image.
  """
  if factor == 1:
    return logits, valid
  total = _pool(logits * valid[..., None], factor)
  count = _pool(valid[..., None], factor)
  return total / jnp.maximum(count, 1e-12), (count[..., 0] > 0).astype(jnp.float32)


def _constraints(present, large, c, *, fg_lower, bg_lower, bg_upper, fg_slack, background_class,
                 size_constraint, size_bg_lower, size_fg_lower):
  """Rows A [C+1, C], bounds b [N, C+1] and caps [N, C+1] (0 = inactive row)."""
  eye = jnp.eye(c, dtype=jnp.float32)
  inf = jnp.float32(jnp.inf)
  is_bg = jnp.zeros((c,), bool) if background_class is None else (
      jnp.arange(c) == background_class)
  lower = jnp.where(is_bg, size_bg_lower if size_constraint else bg_lower, fg_lower)
  lower = jnp.broadcast_to(lower, present.shape)
  cap = jnp.where(is_bg, inf, fg_slack)
  cap = jnp.broadcast_to(cap, present.shape)
  if size_constraint:
    lower = jnp.where(large & ~is_bg, size_fg_lower, lower)
    cap = jnp.where(large & ~is_bg, inf, cap)
  cap = jnp.where(present, cap, 0.0)
  if background_class is None:
    upper_row = jnp.zeros((1, c), jnp.float32)
    upper_active = jnp.zeros(present.shape[:1], bool)
  else:
    upper_row = -eye[background_class][None]
    upper_active = present[:, background_class] & jnp.any(present & ~is_bg, axis=-1)
  a = jnp.concatenate([eye, upper_row], axis=0)
  b = jnp.concatenate([lower, jnp.full(present.shape[:1] + (1,), -bg_upper)], axis=-1)
  caps = jnp.concatenate([cap, jnp.where(upper_active, inf, 0.0)[:, None]], axis=-1)
  return a, b.astype(jnp.float32), caps.astype(jnp.float32)


def _dual_parts(f, v, a, b, mu, beta):
  """Dual value, gradient and Hessian for one image (f [P,C], v [P] weights summing to 1)."""
  z = beta * (f + mu @ a)
  lse = jax.nn.logsumexp(z, axis=-1)
  p = jnp.exp(z - lse[:, None])
  value = jnp.sum(v * lse) / beta - mu @ b
  mean_p = v @ p
  grad = a @ mean_p - b
  cov = jnp.diag(mean_p) - jnp.einsum("i,ik,il->kl", v, p, p)
  hess = beta * (a @ cov @ a.T)
  return value, grad, hess


def _projected_gradient(mu, grad, cap):
  at_lower = (mu <= 0.0) & (grad > 0.0)
  at_upper = (mu >= cap) & (grad < 0.0)
  return jnp.where(at_lower | at_upper | (cap <= 0.0), 0.0, grad)


def _solve_newton(f, v, a, b, cap, beta, iterations):
  m = a.shape[0]
  steps_n = jnp.asarray(_NEWTON_STEPS, jnp.float32)
  steps_g = jnp.asarray(_GRADIENT_STEPS, jnp.float32)

  def value_and_pg(mu):
    value, grad, _ = _dual_parts(f, v, a, b, mu, beta)
    return value, jnp.sum(jnp.square(_projected_gradient(mu, grad, cap)))

  def body(_, mu):
    value, grad, hess = _dual_parts(f, v, a, b, mu, beta)
    free = _projected_gradient(mu, grad, cap) != 0.0
    damp = 1e-6 + 1e-4 * jnp.trace(hess) / m
    h = jnp.where(free[:, None] & free[None, :], hess, 0.0) + jnp.diag(
        jnp.where(free, damp, 1.0))
    direction = -jnp.linalg.solve(h, jnp.where(free, grad, 0.0))
    # A (numerically) singular Hessian -- hard P at large hardness -- gives no Newton step;
    # the projected-gradient candidates still do.
    direction = jnp.where(jnp.all(jnp.isfinite(direction)), direction, 0.0)
    cands = jnp.concatenate([
        mu[None],
        jnp.clip(mu[None] + steps_n[:, None] * direction[None], 0.0, cap[None]),
        jnp.clip(mu[None] - steps_g[:, None] * grad[None], 0.0, cap[None]),
    ])
    values, pgs = jax.vmap(value_and_pg)(cands)
    values = jnp.where(jnp.isfinite(values), values, jnp.inf)
    pgs = jnp.where(jnp.isfinite(pgs), pgs, jnp.inf)
    best = jnp.argmin(values)
    # Near the optimum float32 cannot rank candidates by g; the projected gradient still can.
    flat = values[0] - values[best] <= 1e-6 * jnp.maximum(1.0, jnp.abs(values[0]))
    return cands[jnp.where(flat, jnp.argmin(pgs), best)]

  return jax.lax.fori_loop(0, iterations, body, jnp.zeros((m,), jnp.float32))


def _solve_pgd(f, v, a, b, cap, beta, iterations, step0=10.0):
  m = a.shape[0]

  def value(mu):
    return _dual_parts(f, v, a, b, mu, beta)[0]

  def body(_, carry):
    mu, g, alpha = carry
    grad = _dual_parts(f, v, a, b, mu, beta)[1]
    cand = jnp.clip(mu - alpha * grad, 0.0, cap)
    gc = value(cand)
    accept = jnp.isfinite(gc) & (gc < g)
    return (jnp.where(accept, cand, mu), jnp.where(accept, gc, g),
            jnp.where(accept, alpha * 1.1, alpha * 0.5))

  mu0 = jnp.zeros((m,), jnp.float32)
  mu, _, _ = jax.lax.fori_loop(0, iterations, body, (mu0, value(mu0), jnp.float32(step0)))
  return mu


def constrained_posterior(logits: jax.Array, tags: jax.Array, *,
                          valid: Optional[jax.Array] = None,
                          fg_lower: float = 0.05,
                          bg_lower: float = 0.3,
                          bg_upper: float = 0.7,
                          fg_slack: float = 2.0,
                          background_class: Optional[int] = 0,
                          size_constraint: bool = False,
                          large: Optional[jax.Array] = None,
                          size_bg_lower: float = 0.2,
                          size_fg_lower: float = 0.1,
                          hardness: float = 1.0,
                          iterations: Optional[int] = None,
                          solver: str = "newton") -> Tuple[jax.Array, jax.Array]:
  """CCNN's latent distribution: the KL projection of softmax(logits) onto the constraints.

  See the module docstring for the constraints and the dual. No gradient flows through it.

  Args:
    logits: float32 [N,H,W,C] class scores (every pixel of an image is one of CCNN's i).
    tags: [N,C] image-level multi-hot (> 0.5 = present). An image with no tag at all gets no
      constraint (P = Q).
    valid: optional bool [N,H,W]; only valid pixels enter the constraints.
    fg_lower, bg_lower, bg_upper, fg_slack: see the module docstring.
    background_class: the background's index, or None when every class is a foreground
      class (datasets without background: no background rows).
    size_constraint, large, size_bg_lower, size_fg_lower: CCNN's size mode; ``large`` [N,C]
      marks classes covering > 10% of the image.
    hardness: CCNN's beta (> 0): P = softmax(beta (f + A^T mu)); 1000 in its size mode.
    iterations: solver iterations (default 20 for "newton", 300 for "pgd").
    solver: "newton" or "pgd".

  Returns:
    (P float32 [N,H,W,C] with absent classes at 0, multipliers float32 [N,C+1] in logit units:
    rows 0..C-1 are the lower bounds of classes 0..C-1, row C the background upper bound).
  """
  where = "constrained_posterior"
  logits = jax.lax.stop_gradient(_common.check_logits(logits, where))
  n, h, w, c = logits.shape
  if solver not in ("newton", "pgd"):
    raise ValueError(f"{where}: unknown solver {solver!r}; valid: 'newton', 'pgd'")
  if iterations is None:
    iterations = 20 if solver == "newton" else 300
  if not hardness > 0:
    raise ValueError(f"{where}: hardness must be > 0, got {hardness}")
  if int(iterations) != iterations or iterations < 1:
    raise ValueError(f"{where}: iterations must be a positive integer, got {iterations}")
  if tuple(tags.shape) != (n, c):
    raise ValueError(f"{where}: tags must be [N,C] = {(n, c)}, got {tuple(tags.shape)}")
  if background_class is not None and not 0 <= background_class < c:
    raise ValueError(f"{where}: background_class {background_class} is not in [0, {c})")
  if not 0.0 <= bg_lower <= bg_upper <= 1.0:
    raise ValueError(f"{where}: need 0 <= bg_lower <= bg_upper <= 1, got {bg_lower}, {bg_upper}")
  if size_constraint:
    if large is None:
      raise ValueError(f"{where}: size_constraint=True needs the [N,C] size tags ('large')")
    if tuple(large.shape) != (n, c):
      raise ValueError(f"{where}: size tags must be [N,C] = {(n, c)}, got {tuple(large.shape)}")
    large = jnp.asarray(large) > 0.5
  else:
    large = jnp.zeros((n, c), bool)
  v = _common.get_valid({} if valid is None else {"valid": valid}, (n, h, w), where)

  present = jnp.asarray(tags) > 0.5
  untagged = ~jnp.any(present, axis=-1, keepdims=True)
  a, b, cap = _constraints(present, large, c, fg_lower=fg_lower, bg_lower=bg_lower,
                           bg_upper=bg_upper, fg_slack=fg_slack,
                           background_class=background_class, size_constraint=size_constraint,
                           size_bg_lower=size_bg_lower, size_fg_lower=size_fg_lower)
  cap = jnp.where(untagged, 0.0, cap)
  present = present | untagged
  f = jnp.where(present[:, None, None, :], logits, _NEG).reshape(n, h * w, c)
  weights = v.reshape(n, h * w)
  weights = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-12)
  solve = _solve_newton if solver == "newton" else _solve_pgd
  beta = jnp.float32(hardness)
  mu = jax.vmap(lambda fi, vi, bi, ci: solve(fi, vi, a, bi, ci, beta, int(iterations)))(
      f, weights, b, cap)
  p = jax.nn.softmax(beta * (f + (mu @ a)[:, None, :]), axis=-1).reshape(n, h, w, c)
  return jax.lax.stop_gradient(p), jax.lax.stop_gradient(mu)


def image_level_loss(logits: jax.Array, batch: dict, *,
                     fg_lower: float = 0.05,
                     bg_lower: float = 0.3,
                     bg_upper: float = 0.7,
                     fg_slack: float = 2.0,
                     background_class: Optional[int] = 0,
                     size_constraint: bool = False,
                     size_bg_lower: float = 0.2,
                     size_fg_lower: float = 0.1,
                     hardness: float = 1.0,
                     iterations: Optional[int] = None,
                     solver: str = "newton",
                     downscale: int = 8) -> jax.Array:
  """CCNN loss: ``mean_n (1/N_n) sum_i KL(P_i || Q_i)`` with P the constrained posterior.

  CCNN computes the loss on VGG's stride-8 fc8 scores. Here logits come at the input
  resolution, so they are average-pooled over ``downscale`` x ``downscale`` cells first
  (valid pixels only; ``downscale=1`` uses them as given). Averaging logits over a cell is what
  a stride-8 head followed by bilinear upsampling would give up to the interpolation, and the
  gradient flows back to every pixel of the cell.

  The gradient with respect to the (pooled) scores of image n is ``(Q - P) / (N_n * batch)``
  (P is a constant), CCNN's ``(q - p)/N`` averaged over the batch.

  Args:
    logits: float32 [N,H,W,C].
    batch: ``tags`` float32 [N,C] multi-hot incl. background; optional ``valid``; with
      ``size_constraint`` also ``tags_large`` float32 [N,C] (class covers > 10% of the image).
    downscale: pooling factor (positive int).
    Others: see :func:`constrained_posterior`.

  Returns:
    float32 scalar.
  """
  where = "image_level_loss"
  logits = _common.check_logits(logits, where)
  n, h, w, c = logits.shape
  tags = _common.require(batch, "tags", where)
  if tuple(tags.shape) != (n, c):
    raise ValueError(f"{where}: batch['tags'] must be [N,C] = {(n, c)}, got {tuple(tags.shape)}")
  large = _common.require(batch, "tags_large", where) if size_constraint else None
  if int(downscale) != downscale or downscale < 1:
    raise ValueError(f"{where}: downscale must be a positive integer, got {downscale}")
  valid = _common.get_valid(batch, (n, h, w), where)
  pooled, pooled_valid = pool_logits(logits, valid, int(downscale))
  p, _ = constrained_posterior(pooled, tags, valid=pooled_valid, fg_lower=fg_lower,
                               bg_lower=bg_lower, bg_upper=bg_upper, fg_slack=fg_slack,
                               background_class=background_class,
                               size_constraint=size_constraint, large=large,
                               size_bg_lower=size_bg_lower, size_fg_lower=size_fg_lower, hardness=hardness,
                               iterations=iterations, solver=solver)
  log_q = jax.nn.log_softmax(pooled, axis=-1)
  kl = jnp.sum(p * (jnp.log(jnp.maximum(p, 1e-10)) - log_q), axis=-1)
  return jnp.mean(_common.masked_mean_per_image(kl, pooled_valid))

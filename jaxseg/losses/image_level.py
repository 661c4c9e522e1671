"""Image-level tags: CCNN's constrained-posterior loss (Pathak et al., ICCV 2015) and WSSL's
EM-Adapt (Papandreou et al., ICCV 2015); :func:`image_level_loss` ``mode`` picks one.

EM-Adapt (``mode="em_adapt"``, :func:`em_adapt_targets`): the E-step adds per-image adaptive
biases to the tagged classes' scores so that each takes at least a fixed portion of the pixels
(background ``bg_portion``, others ``fg_portion``, 0.2 each), takes the argmax over the tagged
classes, and the M-step is cross-entropy on that (stop-gradient) labelling.

CCNN (``mode="ccnn"``, the default):

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
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from jaxseg.constants import IGNORE_INDEX
from jaxseg.losses import _common
from jaxseg.losses.supervised import cross_entropy

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


# ----------------------------------------------------------------------------------------------
# WSSL EM-Adapt (Papandreou et al. 2015, ``AdaptiveBiasChannel``).


def _em_adapt_one(s, allowed, quota, valid, order, num_iter, margin):
  """EM-Adapt labels of one image: s [P,C] scores, allowed [P,C] bool, quota [C] int, valid [P].

  Every pixel must allow at least one class. Returns int32 [P].
  """
  p, c = s.shape
  s = jnp.where(allowed, s, _NEG)
  order = jnp.asarray(order, jnp.int32)
  # Loops over classes rather than unrolled code: compiles in constant time for any C.

  def adjust(t, bias):
    l = order[t % c]
    biased = s + bias
    gap = jnp.max(biased, axis=-1) - biased[:, l]
    gap = jnp.sort(jnp.where(allowed[:, l] & valid, gap, jnp.inf))
    k = quota[l]
    kth = gap[jnp.maximum(k - 1, 0)]
    return bias.at[l].add(jnp.where((k > 0) & jnp.isfinite(kth), kth + margin, 0.0))

  bias = jax.lax.fori_loop(0, int(num_iter) * c, adjust, jnp.zeros((c,), jnp.float32))
  biased = s + bias
  ranks = jnp.arange(p)

  # Repair. One biased pass guarantees the quota to the last class adjusted only: a later
  # class can take pixels back from an earlier one. For each class short of its quota, move
  # to it the pixels closest to switching (smallest gap) among those whose current class has
  # pixels to spare (a class never drops below its own quota), so every class gets its quota
  # whenever the quotas fit in the pixels it may take.
  def repair(t, labels):
    l = order[t]
    counts = jnp.sum(jax.nn.one_hot(labels, c) * valid[:, None], axis=0).astype(jnp.int32)
    deficit = jnp.maximum(quota[l] - counts[l], 0)
    spare = jnp.concatenate([jnp.maximum(counts - quota, 0), jnp.zeros((1,), jnp.int32)])
    gap = jnp.max(biased, axis=-1) - biased[:, l]
    donor = jnp.where(allowed[:, l] & valid & (labels != l), labels, c)  # c: not a donor
    by_class = jnp.lexsort((gap, donor))  # donors grouped by class, closest first
    grouped = donor[by_class]
    rank_in_class = ranks - jnp.searchsorted(grouped, grouped, side="left")
    eligible = (grouped < c) & (rank_in_class < spare[grouped])
    cost = jnp.where(eligible, gap[by_class], jnp.inf)
    cheapest = jnp.argsort(cost)
    take = (ranks < deficit) & jnp.isfinite(cost[cheapest])
    target = by_class[cheapest]
    return labels.at[target].set(jnp.where(take, l, labels[target]))

  labels = jnp.argmax(biased, axis=-1).astype(jnp.int32)
  return jax.lax.fori_loop(0, c, repair, labels)


def em_adapt_labels(scores: jax.Array, allowed: jax.Array, quota: jax.Array, valid: jax.Array,
                    *, background_class: Optional[int] = 0, num_iter: int = 1,
                    margin: float = 1e-4) -> jax.Array:
  """EM-Adapt's E-step on flattened scores, for any per-pixel label sets and per-class quotas.

  WSSL's ``AdaptiveBiasChannel``: classes no pixel may take are excluded (the reference clips
  absent classes' scores below the present ones); then, for each class in turn -- background
  first, then increasing index (the reference shuffles the foreground) -- its scores are
  raised by the ``quota``-th smallest ``max_allowed - score`` (+ ``margin``) over the pixels
  that may take it, so that at that moment ``quota`` of them do; ``num_iter`` repeats the
  pass; the labelling is the argmax of the biased scores. (The reference's final constant
  shift does not change the argmax and is omitted.) A repair step then moves pixels to any
  class still short of its quota -- those closest to switching, taken only from classes above
  their own quota -- so every class holds at least its quota whenever the quotas fit (e.g.
  their sum is at most the valid pixel count when every class may take every pixel). Sorts
  with dynamic indices only: jit-safe.

  Args:
    scores: float32 [N,P,C] (gradient stopped).
    allowed: bool [N,P,C], the classes each pixel may take; every pixel needs one.
    quota: int32 [N,C], the minimum number of valid pixels of each class (0 = no bias).
    valid: bool [N,P]; only valid pixels count and are moved.
    background_class: adjusted first (None: no special class).
    num_iter: biased passes.
    margin: added to each bias so the ``quota``-th pixel wins its tie.

  Returns:
    int32 [N,P] (argmax over ``allowed`` at invalid pixels).
  """
  n, p, c = scores.shape
  order = tuple(([background_class] if background_class is not None else [])
                + [l for l in range(c) if l != background_class])
  s = jax.lax.stop_gradient(jnp.asarray(scores, jnp.float32))
  fn = lambda si, ai, qi, vi: _em_adapt_one(si, ai, qi, vi, order, num_iter, margin)
  return jax.vmap(fn)(s, jnp.asarray(allowed, bool), jnp.asarray(quota, jnp.int32),
                      jnp.asarray(valid, bool))


def check_portions(where, **portions):
  for name, value in portions.items():
    if not 0.0 <= value <= 1.0:
      raise ValueError(f"{where}: {name} must be in [0, 1], got {value}")


def em_adapt_targets(logits: jax.Array, tags: jax.Array, valid: Optional[jax.Array] = None, *,
                     bg_portion: float = 0.2, fg_portion: float = 0.2, num_iter: int = 1,
                     background_class: Optional[int] = 0, margin: float = 1e-4) -> jax.Array:
  """WSSL EM-Adapt E-step with image-level tags (see :func:`em_adapt_labels`).

  The tagged classes (tags > 0.5) are the image's label set; each gets at least
  ``floor(portion * #valid pixels)`` pixels -- ``bg_portion`` for ``background_class``,
  ``fg_portion`` for the others (WSSL: 0.2 and 0.2) -- when the portions of the tagged classes
  sum to at most 1. The background is a class like any other here: it is in the label set only
  when tagged (WSSL's VOC tags always include it).

  Args:
    logits: float32 [N,H,W,C] scores (gradient stopped).
    tags: [N,C] multi-hot.
    valid: optional bool [N,H,W].

  Returns:
    int32 [N,H,W]; 255 on invalid pixels and on images without any tag (no target).
  """
  where = "em_adapt_targets"
  logits = _common.check_logits(logits, where)
  n, h, w, c = logits.shape
  if tuple(tags.shape) != (n, c):
    raise ValueError(f"{where}: tags must be [N,C] = {(n, c)}, got {tuple(tags.shape)}")
  if background_class is not None and not 0 <= background_class < c:
    raise ValueError(f"{where}: background_class {background_class} is not in [0, {c})")
  check_portions(where, bg_portion=bg_portion, fg_portion=fg_portion)
  v = _common.get_valid({} if valid is None else {"valid": valid}, (n, h, w), where)
  v = v.reshape(n, h * w) > 0
  present = jnp.asarray(tags) > 0.5
  untagged = ~jnp.any(present, axis=-1)
  # An untagged image gets every class (so the argmax is defined) and no target.
  allowed = jnp.broadcast_to((present | untagged[:, None])[:, None, :], (n, h * w, c))
  portion = jnp.full((c,), fg_portion, jnp.float32)
  if background_class is not None:
    portion = portion.at[background_class].set(bg_portion)
  count = jnp.sum(v, axis=-1).astype(jnp.float32)
  quota = jnp.floor(portion[None] * count[:, None]).astype(jnp.int32) * present
  labels = em_adapt_labels(logits.reshape(n, h * w, c), allowed, quota, v,
                           background_class=background_class, num_iter=num_iter, margin=margin)
  labels = jnp.where(v & ~untagged[:, None], labels, IGNORE_INDEX)
  return labels.reshape(n, h, w)


_MODES = ("ccnn", "em_adapt")


def image_level_loss(logits: jax.Array, batch: dict, *,
                     mode: str = "ccnn",
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
                     bg_portion: float = 0.2,
                     fg_portion: float = 0.2,
                     num_iter: int = 1,
                     class_weights: Optional[Sequence[float]] = None,
                     downscale: int = 8) -> jax.Array:
  """Image-level (tag) supervision: CCNN (default) or WSSL EM-Adapt.

  ``mode="ccnn"``: ``mean_n (1/N_n) sum_i KL(P_i || Q_i)`` with P the constrained posterior.
  The gradient with respect to the (pooled) scores of image n is ``(Q - P) / (N_n * batch)``
  (P is a constant), CCNN's ``(q - p)/N`` averaged over the batch.

  ``mode="em_adapt"``: cross-entropy on :func:`em_adapt_targets` (stop-gradient E-step labels
  from the network's own scores with adaptive biases, so each tagged class takes at least its
  portion of the pixels).

  Both methods work on VGG's stride-8 fc8 scores. Here logits come at the input resolution,
  so they are average-pooled over ``downscale`` x ``downscale`` cells first (valid pixels only;
  ``downscale=1`` uses them as given). Averaging logits over a cell is what a stride-8 head
  followed by bilinear upsampling would give up to the interpolation, and the gradient flows
  back to every pixel of the cell.

  Args:
    logits: float32 [N,H,W,C].
    batch: ``tags`` float32 [N,C] multi-hot incl. background; optional ``valid``; with
      ``size_constraint`` also ``tags_large`` float32 [N,C] (class covers > 10% of the image;
      the data pipeline emits it with ``tags``).
    mode: "ccnn" or "em_adapt".
    bg_portion, fg_portion, num_iter: "em_adapt" (WSSL defaults 0.2, 0.2, 1).
    class_weights: optional [C] cross-entropy weights ("em_adapt").
    downscale: pooling factor (positive int).
    Others: "ccnn", see :func:`constrained_posterior`.

  Returns:
    float32 scalar.
  """
  where = f"image_level_loss({mode})"
  if mode not in _MODES:
    raise ValueError(f"image_level_loss: unknown mode {mode!r}; valid: {', '.join(_MODES)}")
  logits = _common.check_logits(logits, where)
  n, h, w, c = logits.shape
  tags = _common.require(batch, "tags", where)
  if tuple(tags.shape) != (n, c):
    raise ValueError(f"{where}: batch['tags'] must be [N,C] = {(n, c)}, got {tuple(tags.shape)}")
  if int(downscale) != downscale or downscale < 1:
    raise ValueError(f"{where}: downscale must be a positive integer, got {downscale}")
  valid = _common.get_valid(batch, (n, h, w), where)
  pooled, pooled_valid = pool_logits(logits, valid, int(downscale))
  if mode == "em_adapt":
    labels = em_adapt_targets(pooled, tags, pooled_valid, bg_portion=bg_portion,
                              fg_portion=fg_portion, num_iter=num_iter,
                              background_class=background_class)
    with _common.labels_checked():  # E-step labels are in [0, C) by construction
      return cross_entropy(pooled, {"mask": labels, "valid": pooled_valid > 0},
                           class_weights=class_weights)
  large = _common.require(batch, "tags_large", where) if size_constraint else None
  p, _ = constrained_posterior(pooled, tags, valid=pooled_valid, fg_lower=fg_lower,
                               bg_lower=bg_lower, bg_upper=bg_upper, fg_slack=fg_slack,
                               background_class=background_class,
                               size_constraint=size_constraint, large=large,
                               size_bg_lower=size_bg_lower, size_fg_lower=size_fg_lower,
                               hardness=hardness, iterations=iterations, solver=solver)
  log_q = jax.nn.log_softmax(pooled, axis=-1)
  kl = jnp.sum(p * (jnp.log(jnp.maximum(p, 1e-10)) - log_q), axis=-1)
  return jnp.mean(_common.masked_mean_per_image(kl, pooled_valid))

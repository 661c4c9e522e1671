"""Auxiliary heads in training: the trainer adds ``aux_weight`` x the loss of every sown
``aux_logits``, the gradient reaches the aux head only through that term, and eval-mode
models compute the aux head only when the caller asks for ``intermediates``.

A thin DeepLab v3 (ResNet-18 at 1/8 width, ``aux=True``: an FCNHead on c4) takes one SGD
step (no momentum, so the update is -lr x gradient) from the same state and rng with
``aux_weight`` 0.4 (``make_train_step``) and 0 (the pure step function it jits).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxseg
from jaxseg.models import heads
from tests.models import models_testutil as tu

torch = pytest.importorskip("torch")
F = torch.nn.functional

AUX_WEIGHT = 0.4
LR = 0.1
# Compile time dominates on a CPU: the test's own programs use XLA's optimisation level 0.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module")
def run():
  model = jaxseg.models.build("deeplabv3", num_classes=3, backbone="resnet18",
                              width_multiplier=1 / 8, aux=True)
  images, labels = tu.toy_batch(n=2, h=33, w=45, num_classes=3, block=12)
  batch = {"image": np.asarray(images), "mask": np.asarray(labels)}
  variables = jax.jit(functools.partial(model.init, train=False),
                      compiler_options=FAST_COMPILE)(tu.key(0), images)
  state = jaxseg.train.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                         batch_stats=variables["batch_stats"],
                                         tx=optax.sgd(LR))
  rng = jax.random.key(7)
  out = {"model": model, "batch": batch, "state": state, "rng": rng}
  step = jaxseg.train.make_train_step(jaxseg.losses.cross_entropy, aux_weight=AUX_WEIGHT,
                                      num_classes=3, donate=False)
  out[AUX_WEIGHT] = step(jaxseg.train.replicate_on_mesh(state, step.mesh), batch, rng)
  pure = functools.partial(jaxseg.train.step.train_step_fn, loss_fn=jaxseg.losses.cross_entropy,
                           aux_weight=0.0)
  out[0.0] = jax.jit(pure, compiler_options=FAST_COMPILE)(
      state, jax.tree.map(jnp.asarray, batch), rng)
  return out


def _np(tree):
  return jax.tree.map(np.asarray, tree)


def test_metrics_report_main_and_aux_losses_and_their_weighted_sum(run):
  _, m4 = run[AUX_WEIGHT]
  _, m0 = run[0.0]
  m4, m0 = _np(m4), _np(m0)
  assert {"loss", "main_loss", "aux_loss", "grad_norm"} <= set(m4)
  assert {"loss", "main_loss", "aux_loss", "grad_norm"} <= set(m0)
  np.testing.assert_allclose(m4["loss"], m4["main_loss"] + AUX_WEIGHT * m4["aux_loss"], rtol=1e-6)
  np.testing.assert_allclose(m0["loss"], m0["main_loss"], rtol=1e-6)
  # Same state, batch and rng: the same forward pass, only the weighting differs.
  np.testing.assert_allclose(m4["main_loss"], m0["main_loss"], rtol=1e-6)
  np.testing.assert_allclose(m4["aux_loss"], m0["aux_loss"], rtol=1e-6)
  assert m4["aux_loss"] > 0.1 and abs(m4["loss"] - m0["loss"]) > 0.01
  assert m4["grad_norm"] != m0["grad_norm"]


def test_main_and_aux_losses_are_the_cross_entropies_of_the_two_outputs(run):
  """Recomputed outside the trainer: the same train-mode forward (same dropout rng), torch CE."""
  model, batch, state = run["model"], run["batch"], run["state"]
  (logits, mutated) = jax.jit(lambda v, x, r: model.apply(
      v, x, train=True, rngs={"dropout": r}, mutable=["batch_stats", "intermediates"]),
      compiler_options=FAST_COMPILE)(state.variables(), batch["image"], run["rng"])
  (aux,) = mutated["intermediates"]["aux_logits"]
  labels = torch.from_numpy(np.array(batch["mask"], np.int64))
  main_ref = F.cross_entropy(torch.from_numpy(tu.nchw(logits)), labels).item()
  aux_ref = F.cross_entropy(torch.from_numpy(tu.nchw(aux)), labels).item()
  _, m4 = run[AUX_WEIGHT]
  np.testing.assert_allclose(float(m4["main_loss"]), main_ref, rtol=1e-5)
  np.testing.assert_allclose(float(m4["aux_loss"]), aux_ref, rtol=1e-5)
  assert abs(main_ref - aux_ref) > 1e-3  # the two heads really are different outputs


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _changed(after, before):
  return float(np.abs(np.asarray(after) - np.asarray(before)).max())


def test_aux_head_moves_only_when_its_loss_is_weighted(run):
  before = _np(run["state"].params)
  p4 = _np(run[AUX_WEIGHT][0].params)
  p0 = _np(run[0.0][0].params)
  aux_before = jax.tree_util.tree_flatten_with_path(before["aux_classifier"])[0]
  aux4 = jax.tree.leaves(p4["aux_classifier"])
  aux0 = jax.tree.leaves(p0["aux_classifier"])
  for (path, b), a4, a0 in zip(aux_before, aux4, aux0):
    name = jax.tree_util.keystr(path)
    assert _changed(a4, b) > 0, name          # aux_weight 0.4: every aux parameter moves
    np.testing.assert_array_equal(a0, b, err_msg=name)   # aux_weight 0: exactly zero update


def test_every_parameter_gets_a_gradient_with_the_aux_loss(run):
  """The whole model trains: the first conv and every other array move in one SGD step."""
  before = jax.tree_util.tree_flatten_with_path(_np(run["state"].params))[0]
  after = jax.tree.leaves(_np(run[AUX_WEIGHT][0].params))
  assert len(before) == len(after)
  for (path, b), a in zip(before, after):
    assert np.all(np.isfinite(a)), jax.tree_util.keystr(path)
    assert _changed(a, b) > 0, jax.tree_util.keystr(path)
  assert _changed(_at(_np(run[AUX_WEIGHT][0].params), ("backbone", "conv1", "kernel")),
                  _at(_np(run["state"].params), ("backbone", "conv1", "kernel"))) > 0


def test_aux_gradient_flows_into_the_shared_backbone_only_below_c4(run):
  before = _np(run["state"].params)
  p4 = _np(run[AUX_WEIGHT][0].params)
  p0 = _np(run[0.0][0].params)

  def update_difference(path):
    """max |update(0.4) - update(0)| / max |update(0)| over the arrays under ``path``."""
    u4 = jax.tree.leaves(jax.tree.map(np.subtract, _at(p4, path), _at(before, path)))
    u0 = jax.tree.leaves(jax.tree.map(np.subtract, _at(p0, path), _at(before, path)))
    scale = max(np.abs(u).max() for u in u0)
    assert scale > 0, path  # the main loss moves every part of the model
    return max(np.abs(a - b).max() for a, b in zip(u4, u0)) / scale

  # The aux head reads c4 (layer3 output): the stem and layer1-3 also get its gradient
  # (about 20% of the update here)...
  for path in (("backbone", "conv1"), ("backbone", "layer1"), ("backbone", "layer3")):
    assert update_difference(path) > 0.05, path
  # ...while layer4 and the main classifier only see the main loss: the same update, up to
  # float32 rounding (~5e-5: the two steps are compiled with different XLA options).
  for path in (("backbone", "layer4"), ("classifier",)):
    assert update_difference(path) < 1e-3, path


def _aux_head_calls(model, variables, images, **kwargs):
  """Keys read by the model's FCNHead (the aux head) while ``apply`` is traced."""
  calls = []

  def spy(next_fun, args, kw, context):
    if isinstance(context.module, heads.FCNHead) and context.method_name == "__call__":
      calls.append(context.module.in_key)
    return next_fun(*args, **kw)

  with nn.intercept_methods(spy):
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, **kwargs), variables, images)
  return calls, out


def test_eval_mode_computes_aux_logits_only_on_request(run):
  model, state = run["model"], run["state"]
  images = jnp.asarray(run["batch"]["image"])
  variables = state.variables()
  calls, out = _aux_head_calls(model, variables, images)
  assert calls == [] and out.shape == (2, 33, 45, 3)
  calls, (out, inter) = _aux_head_calls(model, variables, images, mutable=["intermediates"])
  assert calls == ["c4"] and out.shape == (2, 33, 45, 3)
  assert inter["intermediates"]["aux_logits"][0].shape == (2, 33, 45, 3)

  def three_ways(v, x):
    plain = model.apply(v, x, train=False)
    logits, inter = model.apply(v, x, train=False, mutable=["intermediates"])
    # The aux head alone on the backbone's features, at its own (stride-16) resolution.
    low = model.apply(v, x, method=lambda m, x: m.aux_classifier(m.backbone(x, train=False),
                                                                 train=False))
    return plain, logits, inter, low

  plain, logits, inter, low = jax.jit(three_ways, compiler_options=FAST_COMPILE)(variables,
                                                                                 images)
  (aux,) = inter["intermediates"]["aux_logits"]
  np.testing.assert_allclose(np.asarray(plain), np.asarray(logits), rtol=1e-6, atol=1e-6)
  assert aux.shape == (2, 33, 45, 3) and aux.dtype == jnp.float32
  # The sown values are those logits resized like the main logits (deeplabv3: bilinear,
  # align_corners=True), checked against torch's interpolate.
  assert low.shape == (2, 3, 3, 3)
  ref = F.interpolate(torch.from_numpy(tu.nchw(low)), size=(33, 45), mode="bilinear",
                      align_corners=True)
  np.testing.assert_allclose(np.asarray(aux), tu.nhwc(ref), rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(aux) - np.asarray(logits)).max() > 1e-3

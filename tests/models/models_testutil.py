"""Helpers shared by the model tests (not a test module)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax.extend import core as jcore

import jaxseg


def key(seed=0):
  # The rbg PRNG compiles several times faster than threefry on CPU, which
  # dominates model.init in these small tests.
  return jax.random.key(seed, impl="rbg")


def init(model, images, **kwargs):
  return jax.jit(functools.partial(model.init, train=False, **kwargs))(key(0), images)


def param_count(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def abstract_variables(model, shape):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(lambda x: model.init(key(0), x, train=False), x)


def abstract_output(model, shape):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(lambda x: model.apply(model.init(key(0), x, train=False), x,
                                              train=False), x)


def toy_batch(n=2, h=32, w=32, num_classes=3, block=16, seed=0):
  """Images made of ``block``-px squares of class colours (plus noise); labels = class.

  Coarse (stride 8-32) models can fit these labels too, up to the few pixels
  where their bilinear upsampling blends neighbouring squares.
  """
  rng = np.random.RandomState(seed)
  palette = rng.uniform(size=(num_classes, 3))
  cls = rng.randint(0, num_classes, size=(n, -(-h // block), -(-w // block)))
  labels = np.repeat(np.repeat(cls, block, axis=1), block, axis=2)[:, :h, :w]
  images = palette[labels] + 0.05 * rng.randn(n, h, w, 3)
  return jnp.asarray(np.clip(images, 0, 1), jnp.float32), jnp.asarray(labels, jnp.int32)


def train_steps(model, images, labels, *, steps=100, lr=3e-3, variables=None):
  """Adam on mean CE; returns (losses, final variables, gradients of the last step)."""
  variables = init(model, images) if variables is None else variables
  params, stats = variables["params"], variables.get("batch_stats", {})
  tx = optax.adam(lr)
  opt = tx.init(params)

  @jax.jit
  def step(params, stats, opt, rng):
    def loss_fn(p):
      logits, upd = model.apply({"params": p, "batch_stats": stats}, images, train=True,
                                mutable=["batch_stats"], rngs={"dropout": rng})
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), upd
    (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), upd.get("batch_stats", {}), opt, loss, grads

  losses = []
  for i in range(steps):
    params, stats, opt, loss, grads = step(params, stats, opt, key(i + 1))
    losses.append(float(loss))
  out = {"params": params}
  if stats:
    out["batch_stats"] = stats
  return losses, out, grads


def nchw(x):
  return np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))


def nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def randomise_batch_norms(model, seed=0):
  """Sets every torch BatchNorm2d's statistics and affine parameters to non-trivial values,
  so that parity tests see the normalisation (fresh layers are the identity in eval)."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        c = m.num_features
        m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
        m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
        m.weight.copy_(torch.rand(c, generator=g) + 0.5)
        m.bias.copy_(torch.rand(c, generator=g) - 0.5)
  return model


# A tiny variant of every registered model (traced in tests; widths cut to the minimum).
TINY_VARIANTS = {
    "deeplabv1": dict(width_multiplier=1 / 32),
    "deeplabv2": dict(backbone="resnet50", width_multiplier=1 / 16),
    "deeplabv3": dict(backbone="resnet18", width_multiplier=1 / 16),
    "deeplabv3_resnet101": dict(width_multiplier=1 / 16),
    "deeplabv3_resnet50": dict(width_multiplier=1 / 16),
    "deeplabv3plus": dict(backbone="mobilenet_v2", width_multiplier=0.25),
    "dilation": dict(width_multiplier=1 / 32),
    "fcn16s": dict(width_multiplier=1 / 32),
    "fcn32s": dict(width_multiplier=1 / 32),
    "fcn8s": dict(width_multiplier=1 / 32),
    "fcn_resnet101": dict(width_multiplier=1 / 16),
    "fcn_resnet50": dict(width_multiplier=1 / 16),
    "maskrcnn": dict(jaxseg.models.maskrcnn.TINY),
    "pspnet": dict(backbone="resnet18", width_multiplier=1 / 16),
    "refinenet": dict(backbone="resnet18", width_multiplier=1 / 16),
    "segnet": dict(width_multiplier=1 / 16),
    "unet": dict(features=4, depth=2),
}


def jaxpr_equations(jaxpr):
  """Every equation of ``jaxpr`` and of the jaxprs nested in its equations' parameters."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        if isinstance(sub, jcore.ClosedJaxpr):
          yield from jaxpr_equations(sub.jaxpr)
        elif isinstance(sub, jcore.Jaxpr):
          yield from jaxpr_equations(sub)

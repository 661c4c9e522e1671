"""The train step hands ``targets=batch`` and a ``sampling`` RNG to models that ask for them."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxseg.train import state as state_lib
from jaxseg.train import step as step_lib


class BoxScorer(nn.Module):
  """Scores each gt box by the mean image value inside it; samples one box per image."""
  takes_targets = True

  @nn.compact
  def __call__(self, images, *, train, targets=None):
    w = self.param("w", nn.initializers.ones, (3,))
    feat = images @ w  # [N,H,W]
    if not train:
      return {"score": feat.mean(axis=(1, 2))}
    assert targets is not None, "the step must pass targets in training"
    n, h, wd = feat.shape
    ys, xs = jnp.arange(h)[:, None], jnp.arange(wd)[None, :]
    b = targets["boxes"]
    inside = ((ys >= b[..., 0, None, None]) & (ys <= b[..., 2, None, None])
              & (xs >= b[..., 1, None, None]) & (xs <= b[..., 3, None, None]))
    mean = (feat[:, None] * inside).sum((2, 3)) / jnp.maximum(inside.sum((2, 3)), 1)
    pick = jax.random.randint(self.make_rng("sampling"), (n,), 0, b.shape[1])
    return {"box_mean": mean, "pick": pick,
            "class_logits": jnp.zeros((n, b.shape[1], 3))}


def box_loss(out, batch):
  valid = batch["box_classes"] >= 0
  return jnp.sum(jnp.where(valid, (out["box_mean"] - 1.0) ** 2, 0.0)) / valid.sum()


def _batch(rng, n=4):
  image = rng.random((n, 8, 8, 3), dtype=np.float32)
  boxes = np.tile(np.array([[0, 0, 3, 3], [2, 2, 7, 5]], np.float32), (n, 1, 1))
  classes = np.tile(np.array([1, -1], np.int32), (n, 1))
  return {"image": image, "boxes": boxes, "box_classes": classes,
          "instance_masks": np.zeros((n, 2, 8, 8), np.uint8)}


def _state():
  model = BoxScorer()
  return state_lib.create_train_state(jax.random.key(0), model, optax.sgd(0.1),
                                      np.zeros((1, 8, 8, 3), np.float32))


def test_targets_reach_the_model_and_the_loss_trains_on_them():
  batch = _batch(np.random.default_rng(0))
  step = step_lib.make_train_step(box_loss, donate=False)
  state = _state()
  # The loss by hand: the mean over the first (valid) box of (sum of channels - 1)^2.
  inside = batch["image"][:, :4, :4].sum(-1).mean((1, 2))
  expected = np.mean((inside - 1.0) ** 2)
  state, metrics = step(state, batch, jax.random.key(1))
  np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
  _, metrics2 = step(state, batch, jax.random.key(2))
  assert float(metrics2["loss"]) < float(metrics["loss"])


def test_sampling_rng_comes_from_the_step_key():
  def mean_pick(out, batch):  # exposes the sampled indices through metrics["loss"]
    return jnp.mean(out["pick"].astype(jnp.float32)) + 0.0 * box_loss(out, batch)

  step = step_lib.make_train_step(mean_pick, donate=False)
  batch = _batch(np.random.default_rng(0), n=16)
  state = _state()
  assert step_lib.model_takes_targets(state.apply_fn)
  losses = [float(step(state, batch, jax.random.key(k))[1]["loss"]) for k in (1, 1, 2, 3)]
  assert losses[0] == losses[1]
  assert len({losses[0], losses[2], losses[3]}) == 3


def test_box_classes_range_checked_against_the_detection_head():
  step = step_lib.make_train_step(box_loss, donate=False)
  batch = _batch(np.random.default_rng(0))
  batch["box_classes"][0, 0] = 3  # the head has 3 classes: valid ids are -1..2
  with pytest.raises(ValueError, match=r"box_classes.*\[3\]"):
    step(_state(), batch, jax.random.key(1))


@pytest.mark.parametrize("key,shape,match", [
    ("boxes", (4, 2, 5), r"boxes'\] must have shape \[N,M,4\]"),
    ("boxes", (4, 3, 4), r"boxes'\] must have shape \[N,M,4\]"),
    ("instance_masks", (4, 2, 8, 7), r"instance_masks'\] must have shape \[N,M,H,W\]"),
    ("instance_masks", (4, 8, 8), r"instance_masks'\] must have shape \[N,M,H,W\]"),
])
def test_instance_target_shapes_are_checked(key, shape, match):
  batch = _batch(np.random.default_rng(0))
  batch[key] = np.zeros(shape, batch[key].dtype)
  with pytest.raises(ValueError, match=match):
    step_lib.validate_batch(batch)


@pytest.mark.parametrize("edit, message", [
    (lambda b: b["box_classes"].__setitem__((0, 0), 0), r"box_classes.*0 is the background"),
    (lambda b: b["boxes"].__setitem__((1, 0), [3, 3, 0, 0]), r"inverted"),
    (lambda b: b["boxes"].__setitem__((2, 0), [0, 0, 3, 9]), r"outside|inside"),
], ids=["background-class", "inverted", "outside"])
@pytest.mark.parametrize("parallel", ["jit", "pmap"])
def test_bad_gt_boxes_are_refused_before_the_step(edit, message, parallel):
  batch = _batch(np.random.default_rng(0))
  edit(batch)
  step = step_lib.make_train_step(box_loss, donate=False, parallel=parallel)
  with pytest.raises(ValueError, match=message):
    step(_state(), batch, jax.random.key(0))
  # Padding slots (class -1) may hold any box.
  good = _batch(np.random.default_rng(0))
  good["boxes"][:, 1] = [9, 9, -4, -4]
  step(_state(), good, jax.random.key(0))

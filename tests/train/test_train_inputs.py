"""Bad input gets a clear error naming the problem."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxseg


@pytest.fixture(scope="module")
def setup():
  model = jaxseg.models.build("unet", num_classes=3, features=4, depth=2)
  state = jaxseg.train.create_train_state(jax.random.key(0), model, optax.sgd(0.1),
                                          np.zeros((1, 16, 16, 3), np.float32))
  step = jaxseg.train.make_train_step(jaxseg.losses.cross_entropy, num_classes=3, donate=False)
  return jaxseg.train.replicate_on_mesh(state, step.mesh), step


def _batch(**over):
  rng = np.random.default_rng(0)
  b = {"image": rng.random((2, 16, 16, 3), dtype=np.float32),
       "mask": rng.integers(0, 3, (2, 16, 16)).astype(np.int32)}
  b.update(over)
  return b


def test_good_batch_trains(setup):
  state, step = setup
  _, metrics = step(state, _batch(), jax.random.key(0))
  assert np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("image, exc, msg", [
    (np.zeros((16, 16, 3), np.float32), ValueError, r"\[N,H,W,3\]"),
    (np.zeros((2, 16, 16, 1), np.float32), ValueError, "3 \\(RGB\\) channels"),
    (np.zeros((2, 16, 16, 3), np.uint8), TypeError, "float32 in \\[0, 1\\]"),
])
def test_bad_images(setup, image, exc, msg):
  state, step = setup
  with pytest.raises(exc, match=msg):
    step(state, _batch(image=image), jax.random.key(0))


def test_labels_out_of_range(setup):
  state, step = setup
  mask = np.zeros((2, 16, 16), np.int32)
  mask[0, 0, 0] = 7
  mask[1, 0, 0] = -1
  mask[1, 1, 1] = 255  # ignore is fine
  with pytest.raises(ValueError, match=r"labels \[-1, 7\] outside \[0, 3\)"):
    step(state, _batch(mask=mask), jax.random.key(0))


def test_label_shape_and_dtype(setup):
  state, step = setup
  with pytest.raises(ValueError, match="must have shape"):
    step(state, _batch(mask=np.zeros((2, 8, 8), np.int32)), jax.random.key(0))
  with pytest.raises(TypeError, match="integer class ids"):
    step(state, _batch(mask=np.zeros((2, 16, 16), np.float32)), jax.random.key(0))


def test_unknown_names():
  with pytest.raises(ValueError, match="unknown loss 'nope'.*cross_entropy"):
    jaxseg.losses.get("nope")
  with pytest.raises(ValueError, match="unet"):
    jaxseg.models.build("nope", num_classes=2)
  with pytest.raises(ValueError, match="parallel must be"):
    jaxseg.train.make_train_step(jaxseg.losses.cross_entropy, parallel="spmd")


def test_create_train_state_checks_images():
  model = jaxseg.models.build("unet", num_classes=3, features=4, depth=2)
  with pytest.raises(ValueError, match=r"\[N,H,W,3\]"):
    jaxseg.train.create_train_state(jax.random.key(0), model, optax.sgd(0.1),
                                    np.zeros((16, 16, 3), np.float32))


def test_the_step_traces_no_label_callback_of_its_own(setup):
  """The step checks batches on the host, so the losses inside it skip their traced range check
  (a reduction and a host callback per step); called alone under jit, the loss keeps it."""
  from tests.models.models_testutil import jaxpr_equations
  state, step = setup
  batch = {"image": np.zeros((2, 16, 16, 3), np.float32), "mask": np.zeros((2, 16, 16), np.int32)}
  sharded = jaxseg.train.shard_batch(batch, step.mesh)
  traced = step.jitted.trace(state, sharded, jax.random.key(0))
  names = {e.primitive.name for e in jaxpr_equations(traced.jaxpr.jaxpr)}
  assert "debug_callback" not in names
  alone = jax.make_jaxpr(jaxseg.losses.cross_entropy)(jnp.zeros((2, 16, 16, 3)), batch)
  assert "debug_callback" in {e.primitive.name for e in jaxpr_equations(alone.jaxpr)}

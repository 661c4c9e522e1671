"""What the train step passes to the loss (``step=``) and how it checks batches.

DESIGN.md "Losses": a loss that declares a keyword ``step`` gets ``step=state.step`` (an int32
scalar array) from the train step, and no other loss does; the batch carries data only.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxseg
from jaxseg.train.step import loss_takes_step

C, N, S = 5, 2, 16


class _Tiny(nn.Module):
  """One conv: what is tested is the step around the model, and this compiles in a blink."""

  @nn.compact
  def __call__(self, x, *, train: bool):
    return nn.Conv(C, (3, 3))(x)


@pytest.fixture(scope="module")
def state():
  model = _Tiny()
  return jaxseg.train.create_train_state(jax.random.key(0), model, optax.sgd(0.1),
                                         np.zeros((1, S, S, 3), np.float32))


def _batch(**over):
  rng = np.random.default_rng(0)
  b = {"image": rng.random((N, S, S, 3), dtype=np.float32),
       "mask": rng.integers(0, C, (N, S, S)).astype(np.int32)}
  b.update(over)
  return b


def _place(state, parallel, **kw):
  step = jaxseg.train.make_train_step(kw.pop("loss"), parallel=parallel, **kw)
  if parallel == "pmap":
    return jaxseg.train.pmap_replicate(state), step
  return jaxseg.train.replicate_on_mesh(state, step.mesh), step


# --- which losses declare `step` ------------------------------------------------------------

def _with_step(logits, batch, *, step, scale=1.0):
  return scale * jnp.mean(logits) + step


def _without_step(logits, batch):
  return jnp.mean(logits)


def _catch_all(logits, batch, **kwargs):
  return jnp.mean(logits)


def test_loss_takes_step_detection():
  assert loss_takes_step(_with_step)
  assert loss_takes_step(functools.partial(_with_step, scale=2.0))
  assert loss_takes_step(lambda logits, batch, step: 0.0)  # positional-or-keyword counts
  assert not loss_takes_step(_without_step)
  assert not loss_takes_step(_catch_all)  # **kwargs does not declare `step`
  assert not loss_takes_step(functools.partial(_catch_all, scale=2.0))
  # A partial that already binds step: the caller chose it, the train step must not override.
  assert not loss_takes_step(functools.partial(_with_step, step=3))
  assert not loss_takes_step(functools.partial(functools.partial(_with_step, scale=2.0), step=3))
  assert not loss_takes_step(lambda logits, batch, step, /: 0.0)  # positional-only: no keyword
  # The library's losses: the warm-up losses declare it, the plain ones do not.
  assert loss_takes_step(jaxseg.losses.scribble_loss)
  assert loss_takes_step(jaxseg.losses.get("scribble_loss", warmup_steps=10))
  assert loss_takes_step(jaxseg.losses.box_loss)
  assert not loss_takes_step(jaxseg.losses.cross_entropy)
  assert not loss_takes_step(jaxseg.losses.get("partial_cross_entropy", class_weights=[1.0] * C))


# --- what the loss receives ------------------------------------------------------------------

@pytest.mark.parametrize("parallel", ["jit", "pmap"])
def test_loss_declaring_step_gets_state_step(state, parallel):
  seen = []

  def loss(logits, batch, *, step):
    seen.append((step.shape, step.dtype))  # at trace time
    assert "step" not in batch  # the batch carries data only
    # Depends on the step and is still differentiable in the logits.
    return 0.0 * jnp.mean(logits) + 10.0 * step.astype(jnp.float32)

  st, train_step = _place(state, parallel, loss=loss)
  losses = []
  for i in range(3):
    st, metrics = train_step(st, _batch(), jax.random.key(i))
    losses.append(float(metrics["loss"]))
  assert losses == [0.0, 10.0, 20.0]
  assert seen and all(s == ((), jnp.int32) for s in seen)


@pytest.mark.parametrize("parallel", ["jit", "pmap"])
def test_losses_not_declaring_step_are_called_without_it(state, parallel):
  got = []

  def catch_all(logits, batch, **kwargs):
    got.append(sorted(kwargs))
    return jaxseg.losses.cross_entropy(logits, batch)

  def plain(logits, batch):  # would raise TypeError on an unexpected step=
    return jaxseg.losses.cross_entropy(logits, batch)

  for loss in (plain, catch_all, functools.partial(catch_all, label_key="mask")):
    st, train_step = _place(state, parallel, loss=loss)
    _, metrics = train_step(st, _batch(), jax.random.key(0))
    assert np.isfinite(float(metrics["loss"]))
  assert got == [[], ["label_key"]]


@pytest.mark.parametrize("parallel", ["jit", "pmap"])
def test_step_traced_once(state, parallel):
  """Inferring C for the label check reuses the step's trace, and the replicated state of
  pmap_replicate matches the pmap step's outputs: one trace (and compile) for 3 steps."""
  traces = []

  def loss(logits, batch):
    traces.append(1)
    return jaxseg.losses.cross_entropy(logits, batch)

  st, train_step = _place(state, parallel, loss=loss)
  for i in range(3):
    st, _ = train_step(st, _batch(), jax.random.key(i))
  assert len(traces) == 1


def test_partial_binding_step_keeps_its_step(state):
  st, train_step = _place(state, "jit", loss=functools.partial(_with_step, step=7, scale=0.0))
  for i in range(2):
    st, metrics = train_step(st, _batch(), jax.random.key(i))
    assert float(metrics["loss"]) == 7.0


def test_warmup_loss_ramps_with_state_step(state):
  """scribble_loss's warm-up reads state.step: pCE alone at step 0, the full loss after."""
  scribble = np.full((N, S, S), 255, np.int32)
  scribble[:, 2:14, 3] = 1
  scribble[:, 2:14, 12] = 3
  batch = _batch(scribble=scribble)
  kw = dict(kernel="local", radius=2, pairwise_weight=5.0)
  warm = jaxseg.losses.get("scribble_loss", warmup_steps=4, **kw)
  results = {}
  for name, loss in [("pce", jaxseg.losses.partial_cross_entropy), ("warm", warm),
                     ("full", jaxseg.losses.get("scribble_loss", **kw))]:
    train_step = jaxseg.train.make_train_step(loss, donate=False)
    for at in (0, 4):
      st = jaxseg.train.replicate_on_mesh(state.replace(step=jnp.int32(at)), train_step.mesh)
      results[name, at] = float(train_step(st, batch, jax.random.key(0))[1]["loss"])
  assert results["warm", 0] == pytest.approx(results["pce", 0], rel=1e-6)
  assert results["warm", 4] == pytest.approx(results["full", 4], rel=1e-6)
  assert results["full", 4] > results["pce", 4] + 1e-3


# --- batch checks, NumPy and device ----------------------------------------------------------

def _device(batch):
  return {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.mark.parametrize("parallel", ["jit", "pmap"])
@pytest.mark.parametrize("num_classes", [C, None])  # None: C read from the model's logits
def test_device_labels_out_of_range(state, parallel, num_classes):
  st, train_step = _place(state, parallel, loss=jaxseg.losses.cross_entropy,
                          num_classes=num_classes)
  mask = np.zeros((N, S, S), np.int32)
  mask[0, 0, 0] = 255  # ignore is fine
  mask[1, 3, 3] = C - 1
  st, metrics = train_step(st, _device(_batch(mask=mask)), jax.random.key(0))
  assert np.isfinite(float(metrics["loss"]))
  mask[1, 2, 2] = 7
  with pytest.raises(ValueError, match=r"batch\['mask'\] has labels \[7\] outside \[0, 5\)"):
    train_step(st, _device(_batch(mask=mask)), jax.random.key(1))
  # Raised before dispatch: the donated state is intact and trains on.
  st, _ = train_step(st, _device(_batch()), jax.random.key(2))

  scribble = np.full((N, S, S), 255, np.int32)
  scribble[0, 5, 5] = -3
  with pytest.raises(ValueError, match=r"batch\['scribble'\] has labels \[-3\]"):
    train_step(st, _device(_batch(scribble=scribble)), jax.random.key(3))
  box_classes = np.array([[1, -1], [C, 0]], np.int32)
  with pytest.raises(ValueError, match=r"batch\['box_classes'\] has labels \[5\] outside \[-1"):
    train_step(st, _device(_batch(box_classes=box_classes)), jax.random.key(4))
  # NumPy batches get the same check, with C inferred when not given.
  with pytest.raises(ValueError, match=r"batch\['mask'\] has labels \[7\]"):
    train_step(st, _batch(mask=mask), jax.random.key(5))


def test_sharded_device_batch_checked_on_device(state):
  """A batch already laid out on the mesh stays there: the count runs on device."""
  st, train_step = _place(state, "jit", loss=jaxseg.losses.cross_entropy)
  good = jaxseg.train.shard_batch(_batch(), train_step.mesh)
  st, _ = train_step(st, good, jax.random.key(0))
  mask = np.zeros((N, S, S), np.int32)
  mask[1, 1, 1] = 9
  bad = jaxseg.train.shard_batch(_batch(mask=mask), train_step.mesh)
  assert isinstance(bad["mask"], jax.Array)
  with pytest.raises(ValueError, match=r"batch\['mask'\] has labels \[9\] outside \[0, 5\)"):
    train_step(st, bad, jax.random.key(1))
  st, _ = train_step(st, good, jax.random.key(2))
  # Validation runs once per step, on the check's own tiny program: one compile, no retrace.
  # (<= 1: in one full-suite run the C++ fast-path cache held no entry here, 0, while the
  # file alone gives 1; a second compile would show as 2.)
  assert train_step.jitted._cache_size() <= 1


def test_jit_and_pmap_steps_take_the_same_state(state):
  """create_train_state's state goes to either step unchanged; each accepts the other's output
  (pmap's carries a device axis) and pmap_unreplicate gives the plain state of both."""
  batch, rng = _batch(), jax.random.key(3)
  jit_step = jaxseg.train.make_train_step(jaxseg.losses.cross_entropy, donate=False)
  pmap_step = jaxseg.train.make_train_step(jaxseg.losses.cross_entropy, parallel="pmap",
                                           donate=False)
  a, _ = jit_step(state, batch, rng)
  b, _ = pmap_step(state, batch, rng)
  assert np.ndim(b.step) == 1 and np.ndim(a.step) == 0
  b = jaxseg.train.pmap_unreplicate(b)
  assert jaxseg.train.pmap_unreplicate(a) is a
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
  # Handing each step's output to the other continues training from it.
  a2, _ = pmap_step(a, batch, rng)
  b2, _ = jit_step(pmap_step(b, batch, rng)[0], batch, rng)
  assert int(jaxseg.train.pmap_unreplicate(a2).step) == 2 and int(b2.step) == 3
  assert not np.allclose(np.asarray(jax.tree.leaves(b2.params)[0]),
                         np.asarray(jax.tree.leaves(b.params)[0]))


def test_old_replicate_names_warn_and_still_work(state):
  with pytest.warns(DeprecationWarning, match="replicate_on_mesh"):
    jaxseg.train.replicate(state, jaxseg.train.make_mesh())
  with pytest.warns(DeprecationWarning, match="pmap_replicate"):
    rep = jaxseg.train.replicate_state(state)
  with pytest.warns(DeprecationWarning, match="pmap_unreplicate"):
    assert int(jaxseg.train.unreplicate_state(rep).step) == 0

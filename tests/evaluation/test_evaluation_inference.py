"""Sliding-window and multi-scale + flip inference against explicit NumPy references.

The references are written from the definitions (Python loops over window positions and
views, NumPy bilinear resizing with PyTorch's half-pixel rule), not from the library code;
they only share ``apply_fn``, the model under test.
"""
import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import jaxseg
from jaxseg.evaluation import inference

C = 3


# ----------------------------------------------------------------------------- apply fns

@functools.lru_cache(maxsize=None)
def unet_apply():
  """A tiny UNet (zero-padded convs, pooling): its output near a pixel depends on where the
  window borders are, so window placement matters. Jitted: compiled once per input shape."""
  model = jaxseg.models.build("unet", num_classes=C, features=4, depth=2)
  # Jitted init with the rbg PRNG: several times faster to compile on CPU than eager threefry.
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0, impl="rbg"), jnp.zeros((1, 8, 8, 3)))
  return jax.jit(lambda x: model.apply(variables, x, train=False))


_MIX = np.array([[1.0, -2.0, 0.5], [0.3, 0.8, -1.2], [-0.7, 0.1, 2.0]], np.float32)


def positional_apply(images):
  """Colour mix + a term that depends on the position inside the input (so inside a window)."""
  _, h, w, _ = images.shape
  yy = jnp.linspace(-1.0, 1.0, h)[:, None, None]
  xx = jnp.linspace(-1.0, 1.0, w)[None, :, None]
  return images @ _MIX + 2.0 * yy * jnp.array([1.0, 0.0, -1.0]) + 3.0 * xx * jnp.array(
      [0.0, 1.0, -0.5])


def pointwise_apply(images):
  """Each pixel's logits depend on that pixel only (no position, no neighbours)."""
  return jnp.tanh(images @ _MIX) * 3.0


def mirror_symmetric_apply(images):
  """Commutes with a horizontal flip: colour mix + [1, 2, 1] horizontal blur (edge-padded)
  + a vertical position term."""
  mixed = images @ _MIX
  padded = jnp.pad(mixed, ((0, 0), (0, 0), (1, 1), (0, 0)), mode="edge")
  blurred = (padded[:, :, :-2] + 2 * padded[:, :, 1:-1] + padded[:, :, 2:]) / 4
  yy = jnp.linspace(-1.0, 1.0, images.shape[1])[:, None, None]
  return 2.0 * blurred + yy * jnp.array([1.0, -1.0, 0.5])


def _images(n, h, w, seed=0):
  return jax.random.uniform(jax.random.key(seed), (n, h, w, 3), jnp.float32)


# ----------------------------------------------------------------------------- references

def ref_profile(length, blend, sigma_scale=1 / 8):
  if blend == "flat":
    return np.ones(length)
  centre, sigma = (length - 1) / 2, sigma_scale * length
  return np.maximum(np.exp(-((np.arange(length) - centre) ** 2) / (2 * sigma ** 2)), 1e-6)


def ref_starts(size, window, stride):
  starts = list(range(0, size - window + 1, stride))
  if starts[-1] + window < size:
    starts.append(size - window)
  return starts


def ref_sliding_window(apply_fn, images, window, stride, blend, pad_mode="constant",
                       sigma_scale=1 / 8):
  images = np.asarray(images)
  n, h, w, _ = images.shape
  (wh, ww), (sh, sw) = window, stride
  ph, pw = max(h, wh), max(w, ww)
  padded = np.pad(images, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)), mode=pad_mode)
  weight = np.outer(ref_profile(wh, blend, sigma_scale), ref_profile(ww, blend, sigma_scale))
  acc = np.zeros((n, ph, pw, C))
  total = np.zeros((ph, pw))
  for y in ref_starts(ph, wh, sh):
    for x in ref_starts(pw, ww, sw):
      logits = np.asarray(apply_fn(jnp.asarray(padded[:, y:y + wh, x:x + ww])), np.float64)
      acc[:, y:y + wh, x:x + ww] += weight[:, :, None] * logits
      total[y:y + wh, x:x + ww] += weight
  return (acc / total[:, :, None])[:, :h, :w]


def ref_resize(x, size):
  """Bilinear, half-pixel centres, no antialiasing (torch ``F.interpolate`` bilinear)."""

  def matrix(n_in, n_out):
    src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(int), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] += 1 - frac
    m[np.arange(n_out), hi] += frac
    return m

  x = np.asarray(x, np.float64)
  return np.einsum("ph,qw,nhwc->npqc", matrix(x.shape[1], size[0]), matrix(x.shape[2], size[1]),
                   x)


def ref_softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def ref_multi_scale_flip(logits_fn, images, scales, flip, base_size=None):
  images = np.asarray(images)
  _, h, w, _ = images.shape
  probs = []
  for s in scales:
    f = s if base_size is None else s * base_size / min(h, w)
    x = ref_resize(images, (max(1, int(h * f + 0.5)), max(1, int(w * f + 0.5))))
    x = x.astype(np.float32)
    probs.append(ref_softmax(ref_resize(np.asarray(logits_fn(x)), (h, w))))
    if flip:
      mirrored = np.asarray(logits_fn(np.ascontiguousarray(x[:, :, ::-1])))[:, :, ::-1]
      probs.append(ref_softmax(ref_resize(mirrored, (h, w))))
  return np.mean(probs, axis=0)


# ----------------------------------------------------------------------------- sliding window

def _slide(apply_fn, images, **kw):
  return jax.jit(lambda x: inference.sliding_window(apply_fn, x, num_classes=C, **kw))(images)


@pytest.mark.parametrize("blend", ["flat", "gaussian"])
def test_one_window_covering_the_image_is_whole_image_inference(blend):
  x = _images(2, 16, 24)
  out = _slide(unet_apply(), x, window=(16, 24), stride=(8, 8), blend=blend)
  assert out.shape == (2, 16, 24, C) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, unet_apply()(x), rtol=1e-5, atol=1e-5)


def test_window_larger_than_the_image_pads_bottom_right_and_crops_back():
  x = _images(2, 6, 7)
  # A per-pixel model is blind to the padding: exactly whole-image inference.
  out = _slide(pointwise_apply, x, window=(8, 8), stride=(4, 4))
  np.testing.assert_allclose(out, pointwise_apply(x), rtol=1e-5, atol=1e-6)
  # A conv net sees the zero padding at the bottom/right: the padded image's logits, cropped.
  out = _slide(unet_apply(), x, window=(8, 8), stride=(4, 4))
  padded = jnp.pad(x, ((0, 0), (0, 2), (0, 1), (0, 0)))
  np.testing.assert_allclose(out, unet_apply()(padded)[:, :6, :7], rtol=1e-5, atol=1e-5)
  out = _slide(unet_apply(), x, window=(8, 8), stride=(4, 4), pad_mode="reflect")
  padded = jnp.pad(x, ((0, 0), (0, 2), (0, 1), (0, 0)), mode="reflect")
  np.testing.assert_allclose(out, unet_apply()(padded)[:, :6, :7], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("blend", ["flat", "gaussian"])
@pytest.mark.parametrize("size,window,stride,batch_windows", [
    ((16, 24), (8, 12), (4, 6), 4),     # sizes multiples of the stride
    ((21, 30), (8, 12), (4, 7), 3),     # not multiples: last windows moved to the border
    ((5, 30), (8, 12), (8, 5), 1),      # shorter than the window vertically
    ((6, 7), (8, 8), (4, 4), 100),      # smaller than the window both ways
])
def test_sliding_window_matches_the_numpy_loop(blend, size, window, stride, batch_windows):
  x = _images(2, *size, seed=1)
  out = _slide(unet_apply(), x, window=window, stride=stride, blend=blend,
               batch_windows=batch_windows)
  want = ref_sliding_window(unet_apply(), x, window, stride, blend)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("blend,pad_mode,sigma_scale", [
    ("gaussian", "reflect", 1 / 8), ("gaussian", "edge", 1 / 40), ("flat", "constant", 1 / 8)])
def test_sliding_window_position_dependent_fn(blend, pad_mode, sigma_scale):
  x = _images(1, 19, 13, seed=2)
  kw = dict(window=(12, 8), stride=(5, 3))
  out = _slide(positional_apply, x, blend=blend, pad_mode=pad_mode, sigma_scale=sigma_scale,
               batch_windows=2, **kw)
  want = ref_sliding_window(positional_apply, x, kw["window"], kw["stride"], blend, pad_mode,
                            sigma_scale)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  # Windows matter here: whole-image inference is different.
  assert np.abs(np.asarray(positional_apply(x)) - want).max() > 0.1


def test_gaussian_and_flat_blends_differ():
  x = _images(1, 19, 13, seed=2)
  kw = dict(window=(12, 8), stride=(5, 3))
  flat = _slide(positional_apply, x, blend="flat", **kw)
  gauss = _slide(positional_apply, x, blend="gaussian", **kw)
  assert np.abs(np.asarray(flat) - np.asarray(gauss)).max() > 0.05


def test_one_traced_call_of_the_window_batch_inside_a_loop():
  shapes = []

  def recording_apply(x):
    shapes.append(x.shape)
    return pointwise_apply(x)

  x = _images(2, 40, 40)
  fn = lambda im: inference.sliding_window(recording_apply, im, num_classes=C, window=(8, 8),
                                           stride=(4, 4), batch_windows=4)
  jaxpr = jax.make_jaxpr(fn)(x)
  # 81 windows, yet the model is traced once, for 4 positions of both images, in a scan.
  assert shapes == [(8, 8, 8, 3)]
  assert "scan" in str(jaxpr)


def test_wrong_logit_shape_is_a_clear_error():
  shrinking = lambda x: pointwise_apply(x)[:, 2:-2, 2:-2]  # e.g. an unpadded (valid) UNet
  with pytest.raises(ValueError, match=r"apply_fn must map .* got \[4, 4, 4, 3\]"):
    _slide(shrinking, _images(1, 16, 16), window=(8, 8), stride=(8, 8))
  with pytest.raises(ValueError, match="apply_fn must map"):
    inference.sliding_window(pointwise_apply, _images(1, 16, 16), num_classes=5, window=8,
                             stride=4)


# ----------------------------------------------------------------------------- multi-scale

def _msf(apply_fn, images, **kw):
  return jax.jit(lambda x: inference.multi_scale_flip(apply_fn, x, num_classes=C, **kw))(images)


def test_multi_scale_flip_matches_the_reference():
  x = _images(2, 16, 16, seed=3)
  scales = (0.5, 0.75, 1.0, 1.25)   # 8, 12, 16, 20: sizes the depth-2 UNet takes unpadded
  out = _msf(unet_apply(), x, scales=scales, flip=True)
  want = ref_multi_scale_flip(lambda v: unet_apply()(jnp.asarray(v)), x, scales, flip=True)
  assert out.shape == (2, 16, 16, C)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.sum(out, -1), 1.0, rtol=1e-5)


def test_multi_scale_with_base_size_and_odd_scales():
  x = _images(1, 10, 15, seed=4)
  scales = (0.7, 1.3)
  out = _msf(positional_apply, x, scales=scales, flip=True, base_size=12)
  want = ref_multi_scale_flip(lambda v: positional_apply(jnp.asarray(v)), x, scales, True, 12)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
  assert inference.scaled_size((10, 15), 1.3, 12) == (16, 23)  # shorter side 12 * 1.3 = 15.6


def test_multi_scale_with_sliding_windows_at_each_scale():
  x = _images(1, 12, 14, seed=5)
  scales, slide = (0.5, 1.5), dict(window=(8, 8), stride=(4, 4), blend="gaussian")
  out = _msf(positional_apply, x, scales=scales, flip=True, slide=slide)
  want = ref_multi_scale_flip(
      lambda v: ref_sliding_window(positional_apply, v, (8, 8), (4, 4), "gaussian"),
      x, scales, flip=True)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_flip_is_a_no_op_for_a_mirror_symmetric_model():
  x = _images(2, 12, 18, seed=6)
  for scales in ((1.0,), (0.5, 1.5)):
    flipped = _msf(mirror_symmetric_apply, x, scales=scales, flip=True)
    plain = _msf(mirror_symmetric_apply, x, scales=scales, flip=False)
    np.testing.assert_allclose(flipped, plain, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_msf(mirror_symmetric_apply, x, scales=(1.0,), flip=False),
                             jax.nn.softmax(mirror_symmetric_apply(x)), rtol=1e-5, atol=1e-6)
  # ...and not for a model that knows left from right.
  flipped = _msf(positional_apply, x, scales=(1.0,), flip=True)
  plain = _msf(positional_apply, x, scales=(1.0,), flip=False)
  assert np.abs(np.asarray(flipped) - np.asarray(plain)).max() > 0.05


# ----------------------------------------------------------------------------- entry point

def test_make_inference_fn_modes():
  x = _images(1, 12, 12, seed=7)
  run = lambda cfg: jax.jit(
      lambda im: inference.make_inference_fn(cfg)(positional_apply, im, C))(x)
  np.testing.assert_allclose(run(None), positional_apply(x), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(run(dict(mode="whole")), positional_apply(x), rtol=1e-6,
                             atol=1e-6)
  slide = dict(mode="slide", window=(8, 8), stride=(4, 4), blend="flat", batch_windows=2)
  np.testing.assert_allclose(run(slide), ref_sliding_window(positional_apply, x, (8, 8), (4, 4),
                                                            "flat"), rtol=1e-5, atol=1e-5)
  # Multi-scale returns log-probabilities: their softmax is the mean probability.
  ms = run(dict(mode="multiscale", scales=(0.5, 1.0), flip=True))
  np.testing.assert_allclose(jax.nn.softmax(ms), _msf(positional_apply, x, scales=(0.5, 1.0)),
                             rtol=1e-5, atol=1e-6)


def test_config_from_saved_json_and_other_modes_keys():
  # config.json stores tuples as lists; a mode switched on the command line leaves the
  # other mode's keys behind.
  saved = json.loads(json.dumps(dict(mode="whole", window=[8, 8], stride=[4, 4],
                                     scales=[1.0], slide=None)))
  config = ml_collections.ConfigDict(saved)
  assert inference.parse_config(config) == ("whole", {})
  config.mode = "slide"
  mode, opts = inference.parse_config(config)
  assert mode == "slide" and opts["window"] == (8, 8) and opts["blend"] == "gaussian"
  config.mode = "multiscale"
  config.slide = dict(window=8, stride=8)
  mode, opts = inference.parse_config(config)
  assert opts["scales"] == (1.0,) and opts["flip"] and opts["slide"]["window"] == (8, 8)


@pytest.mark.parametrize("config,message", [
    (dict(mode="tiles"), "mode must be one of"),
    (dict(mode="slide", window=(8, 8), stride=(9, 4)), r"stride \(9, 4\) must not exceed window"),
    (dict(mode="slide", window=(0, 8), stride=(1, 1)), "window must be positive"),
    (dict(mode="slide", window=8, stride=-2), "stride must be positive"),
    (dict(mode="slide", window=(8, 8, 8), stride=4), r"window must be an int or an \(h, w\) pair"),
    (dict(mode="slide", window=(8.5, 8), stride=4), r"window must be an int or an \(h, w\) pair"),
    (dict(mode="slide", window=(8, 8)), "needs stride"),
    (dict(mode="slide", stride=(8, 8)), "needs window"),
    (dict(mode="slide", window=8, stride=4, blend="cosine"), "blend must be one of"),
    (dict(mode="slide", window=8, stride=4, batch_windows=0), "batch_windows must be a positive"),
    (dict(mode="slide", window=8, stride=4, sigma_scale=0.0), "sigma_scale must be a positive"),
    (dict(mode="slide", window=8, stride=4, pad_mode="wrap"), "pad_mode must be one of"),
    (dict(mode="slide", windw=8, stride=4), r"unknown keys \['windw'\]"),
    (dict(mode="multiscale", scales=()), "scales must be a non-empty"),
    (dict(mode="multiscale", scales=(1.0, -0.5)), "scales must be a non-empty"),
    (dict(mode="multiscale", scales="big"), "scales must be"),
    (dict(mode="multiscale", flip="yes"), "flip must be True or False"),
    (dict(mode="multiscale", base_size=0), "base_size must be None or a positive int"),
    (dict(mode="multiscale", slide=dict(window=8, stride=9)), "must not exceed window"),
    (dict(mode="multiscale", slide=dict(window=8, stride=4, mode="slide")),
     r"slide has unknown keys \['mode'\]"),
    ("slide", "inference config must be a dict"),
])
def test_bad_configs_raise_value_errors_naming_the_problem(config, message):
  with pytest.raises(ValueError, match=message):
    inference.make_inference_fn(config)


def test_direct_calls_validate_too():
  x = _images(1, 8, 8)
  with pytest.raises(ValueError, match="must not exceed window"):
    inference.sliding_window(pointwise_apply, x, num_classes=C, window=4, stride=5)
  with pytest.raises(ValueError, match="scales must be"):
    inference.multi_scale_flip(pointwise_apply, x, num_classes=C, scales=(0,))


# ----------------------------------------------------------------------------- eval step

def _toy_state(h, w):
  model = jaxseg.models.build("unet", num_classes=C, features=4, depth=2)
  return jaxseg.train.create_train_state(jax.random.key(0, impl="rbg"), model, optax.sgd(0.1),
                                         jnp.zeros((1, h, w, 3)))


def test_eval_step_uses_the_inference_config():
  state = _toy_state(16, 16)
  x = _images(2, 20, 12, seed=8)
  mask = np.asarray(jax.random.randint(jax.random.key(1), (2, 20, 12), 0, C), np.int32)
  batch = {"image": np.asarray(x), "mask": mask}
  apply = jax.jit(lambda im: state.apply_fn(state.variables(), im, train=False))

  plain = jaxseg.train.make_eval_step(C)(state, batch)
  np.testing.assert_array_equal(plain["predictions"], np.argmax(apply(x), -1))

  cfg = dict(mode="slide", window=(8, 8), stride=(4, 4), blend="gaussian", batch_windows=3)
  out = jaxseg.train.make_eval_step(C, inference=cfg)(state, batch)
  want = np.argmax(ref_sliding_window(apply, x, (8, 8), (4, 4), "gaussian"), -1)
  np.testing.assert_array_equal(out["predictions"], want)
  assert int(np.asarray(out["confusion"]).sum()) == mask.size


def test_eval_step_rejects_a_bad_config_before_compiling():
  with pytest.raises(ValueError, match="stride"):
    jaxseg.train.make_eval_step(C, inference=dict(mode="slide", window=4, stride=8))


# ----------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_train_time_eval_and_eval_py_with_sliding_windows(tmp_path):
  import os
  import pathlib
  import subprocess
  import sys

  from jaxseg.configs import unet_shapes
  from jaxseg.train import loop
  from tests.train.test_train_loop import assert_metrics_match_split

  repo = pathlib.Path(__file__).resolve().parents[2]
  config = unet_shapes.get_config("smoke")
  config.data_dir = str(tmp_path / "tfds")
  config.update(dict(num_steps=2, eval_every=1, checkpoint_every=2, num_overlays=0))
  # Train-time evaluation (after step 1 and at the end) goes through the configured inference.
  config.inference = dict(mode="slide", window=(32, 32), stride=(16, 16), batch_windows=4)
  workdir = tmp_path / "run"
  summary = loop.train_and_evaluate(config, str(workdir))
  # Overlapping windows are stitched into one prediction per pixel: every labelled pixel of the
  # split is counted once, and the summary is that of the saved confusion matrix.
  validation = loop.load_split(config, "validation")
  trained = json.loads((workdir / "validation_metrics.json").read_text())
  assert_metrics_match_split(summary, trained["confusion_matrix"], validation)

  # A run saved before the key existed, switched to sliding windows from the command line.
  saved = json.loads((workdir / "config.json").read_text())
  del saved["inference"]
  (workdir / "config.json").write_text(json.dumps(saved))
  r = subprocess.run(
      [sys.executable, str(repo / "eval.py"), f"--workdir={workdir}",
       "--config.inference.mode=slide", "--config.inference.window=(32,32)",
       "--config.inference.stride=(16,16)", "--config.inference.blend=flat"],
      cwd=str(repo), env=dict(os.environ, PYTHONPATH=str(repo)), capture_output=True, text=True,
      timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "validation split" in r.stdout and "mIoU" in r.stdout
  result = json.loads((workdir / "eval_validation_metrics.json").read_text())
  assert_metrics_match_split(result, result["confusion_matrix"], validation)

  config = loop.load_config(str(workdir))
  loop.apply_override(config, "inference", "{'mode': 'slide', 'window': 32, 'stride': 64}")
  with pytest.raises(ValueError, match="must not exceed window"):
    loop.evaluate_workdir(str(workdir), config=config)

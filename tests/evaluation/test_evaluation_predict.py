"""jaxseg.predict / predict_files / eval.py --images against plain ``model.apply``.

References: the argmax of ``model.apply`` on the (hand-padded) image, and
``jaxseg.evaluation.sliding_window`` on the same input for images larger than the window;
PNG contents are read back with PIL and compared with hand-computed blends.
"""
import functools
import os
import pathlib
import subprocess
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import jaxseg
from jaxseg.evaluation import visualize

from jaxseg.evaluation import segment as predict_lib

REPO = pathlib.Path(__file__).resolve().parents[2]
C = 3
WINDOW = (32, 32)
NAMES = ["background", "thing", "stuff"]


@functools.lru_cache(maxsize=None)
def tiny_unet():
  model = jaxseg.models.build("unet", num_classes=C, features=4, depth=2)
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0, impl="rbg"), jnp.zeros((1, 8, 8, 3)))
  return model, variables


@functools.lru_cache(maxsize=None)
def reference_apply():
  model, variables = tiny_unet()
  return jax.jit(lambda x: model.apply(variables, x, train=False))


def random_image(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def reference_logits(image_uint8, pad_to=None):
  """model.apply on the image (zero-padded at the bottom/right to ``pad_to``), cropped back."""
  h, w = image_uint8.shape[:2]
  x = image_uint8.astype(np.float32) / 255
  if pad_to is not None:
    x = np.pad(x, ((0, pad_to[0] - h), (0, pad_to[1] - w), (0, 0)))
  return np.asarray(reference_apply()(jnp.asarray(x[None])))[0, :h, :w]


def assert_argmax(labels, logits):
  """labels == argmax(logits) wherever the top two logits are not within float noise."""
  top2 = np.sort(logits, axis=-1)[..., -2:]
  clear = top2[..., 1] - top2[..., 0] > 1e-4
  assert clear.mean() > 0.98
  np.testing.assert_array_equal(labels[clear], logits.argmax(-1)[clear])


# ----------------------------------------------------------------------------- predict

def test_window_sized_image_is_the_argmax_of_apply():
  model, variables = tiny_unet()
  image = random_image(*WINDOW)
  ref = reference_logits(image)
  for window in (None, WINDOW):
    labels = jaxseg.predict(variables, model, image, window=window)
    assert labels.dtype == np.int32 and labels.shape == WINDOW
    assert_argmax(labels, ref)
    logits = predict_lib.predict_logits(variables, model, image, window=window)
    assert logits.dtype == np.float32 and logits.shape == (*WINDOW, C)
    np.testing.assert_allclose(logits, ref, atol=1e-5)
  # float input in [0, 1] is the same image
  np.testing.assert_array_equal(jaxseg.predict(variables, model, image / 255.0, window=WINDOW),
                                jaxseg.predict(variables, model, image, window=WINDOW))


def test_smaller_image_is_padded_to_the_window_and_cropped_back():
  model, variables = tiny_unet()
  image = random_image(20, 27, seed=1)
  logits = predict_lib.predict_logits(variables, model, image, window=WINDOW)
  np.testing.assert_allclose(logits, reference_logits(image, pad_to=WINDOW), atol=1e-5)
  # Whole-image inference runs the model on the image itself: other logits at the borders
  # (the UNet pads 20x27 to 20x28 internally, not to 32x32).
  whole = predict_lib.predict_logits(variables, model, image)
  np.testing.assert_allclose(whole, reference_logits(image), atol=1e-5)
  assert not np.allclose(whole, logits, atol=1e-3)
  assert_argmax(jaxseg.predict(variables, model, image, window=WINDOW), logits)


@pytest.mark.parametrize("size", [(50, 71), (20, 50)])
def test_larger_image_matches_sliding_window(size):
  model, variables = tiny_unet()
  image = random_image(*size, seed=2)
  x = jnp.asarray(image[None].astype(np.float32) / 255)
  ref = np.asarray(jaxseg.evaluation.sliding_window(
      reference_apply(), x, num_classes=C, window=WINDOW, stride=(21, 21)))[0]
  logits = predict_lib.predict_logits(variables, model, image, window=WINDOW, stride=21)
  np.testing.assert_allclose(logits, ref, atol=1e-5)
  labels = jaxseg.predict(variables, model, image, window=WINDOW, stride=(21, 21))
  assert labels.shape == size
  assert_argmax(labels, ref)
  flat = np.asarray(jaxseg.evaluation.sliding_window(
      reference_apply(), x, num_classes=C, window=WINDOW, stride=(16, 16), blend="flat"))[0]
  np.testing.assert_allclose(predict_lib.predict_logits(
      variables, model, image, window=WINDOW, stride=16, blend="flat", batch_windows=3), flat,
      atol=1e-5)
  # Whole-image inference of the same image: one forward pass.
  assert_argmax(jaxseg.predict(variables, model, image), reference_logits(image))


def test_batch_equals_one_image_at_a_time():
  model, variables = tiny_unet()
  images = np.stack([random_image(40, 36, seed=s) for s in range(3)])
  batch = jaxseg.predict(variables, model, images, window=WINDOW)
  assert batch.shape == (3, 40, 36)
  for image, labels in zip(images, batch):
    np.testing.assert_array_equal(labels, jaxseg.predict(variables, model, image, window=WINDOW))


TRACES = []


class CountingNet(nn.Module):
  """A conv net that records every time it is traced (each compilation traces it)."""
  num_classes: int = C

  @nn.compact
  def __call__(self, x, train=False):
    TRACES.append(tuple(x.shape))
    return nn.Conv(self.num_classes, (3, 3))(x)


def test_repeated_calls_do_not_recompile():
  model = CountingNet()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  TRACES.clear()
  jaxseg.predict(variables, model, random_image(32, 32), window=WINDOW)
  after_first = len(TRACES)
  assert after_first >= 1
  # Same shape again, an equal module built anew, and smaller images of other sizes (padded
  # to the window): no new trace.
  jaxseg.predict(variables, model, random_image(32, 32, seed=1), window=WINDOW)
  jaxseg.predict(variables, CountingNet(), random_image(32, 32, seed=2), window=WINDOW)
  jaxseg.predict(variables, model, random_image(17, 30), window=WINDOW)
  jaxseg.predict(variables, model, random_image(5, 9), window=WINDOW)
  assert len(TRACES) == after_first
  # A larger image compiles once for its size, then never again.
  jaxseg.predict(variables, model, random_image(48, 40), window=WINDOW)
  after_large = len(TRACES)
  assert after_large > after_first
  jaxseg.predict(variables, model, random_image(48, 40, seed=3), window=WINDOW)
  assert len(TRACES) == after_large


class FakeInstanceModel(nn.Module):
  takes_targets = True

  @nn.compact
  def __call__(self, x, train=False):
    return x


@pytest.mark.parametrize("images, error, match", [
    (np.full((8, 8, 3), 2.0, np.float32), ValueError, "divide by 255"),
    (np.full((8, 8, 3), -0.5, np.float32), ValueError, "normalised"),
    (np.full((8, 8, 3), np.nan, np.float32), ValueError, "NaN"),
    (np.zeros((1, 3, 16, 16), np.uint8), ValueError, "channels-first.*transpose"),
    (np.zeros((3, 16, 16), np.uint8), ValueError, r"transpose\(1, 2, 0\)"),
    (np.zeros((16, 16, 1), np.uint8), ValueError, "grayscale"),
    (np.zeros((16, 16), np.uint8), ValueError, "grayscale"),
    (np.zeros((16, 16, 4), np.uint8), ValueError, "RGBA"),
    (np.zeros((1, 1, 8, 8, 3), np.uint8), ValueError, "rank 3 or 4"),
    (np.zeros((0, 8, 3), np.uint8), ValueError, "empty"),
    (np.zeros((8, 8, 3), bool), TypeError, "bool"),
    (np.zeros((8, 8, 3), np.int64), TypeError, "int64.*astype"),
    (np.zeros((8, 8, 3), np.uint16), TypeError, "16-bit"),
    (Image.new("RGB", (8, 8)), TypeError, "PIL image"),
])
def test_bad_images_are_refused(images, error, match):
  model, variables = tiny_unet()
  with pytest.raises(error, match=match):
    jaxseg.predict(variables, model, images)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(window=0), ValueError, "window must be positive"),
    (dict(window=(32, 32), stride=(40, 8)), ValueError, "must not exceed window"),
    (dict(stride=8), ValueError, "needs a window"),
    (dict(window=32, blend="mean"), ValueError, "blend"),
    (dict(window=32, batch_windows=0), ValueError, "batch_windows"),
    (dict(variables="params"), TypeError, "variables must be the dict"),
    (dict(model=FakeInstanceModel()), ValueError, "instance segmentation"),
])
def test_bad_arguments_are_refused(kwargs, error, match):
  model, variables = tiny_unet()
  args = dict(variables=variables, model=model)
  args.update({k: kwargs.pop(k) for k in ("variables", "model") if k in kwargs})
  with pytest.raises(error, match=match):
    jaxseg.predict(args["variables"], args["model"], random_image(8, 8), **kwargs)


# ----------------------------------------------------------------------------- files

def write_inputs(folder):
  """PNG RGB, JPEG grayscale, PNG RGBA and a JPEG with an EXIF rotation."""
  folder.mkdir(parents=True, exist_ok=True)
  rgb = random_image(40, 50, seed=4)
  Image.fromarray(rgb).save(folder / "rgb.png")
  Image.fromarray(random_image(20, 24, seed=5)[..., 0]).save(folder / "gray.JPG")
  rgba = np.concatenate([random_image(36, 30, seed=6), np.full((36, 30, 1), 7, np.uint8)], -1)
  Image.fromarray(rgba).save(folder / "rgba.png")
  exif = Image.Exif()
  exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
  Image.fromarray(random_image(24, 44, seed=7)).save(folder / "phone.jpeg", exif=exif)
  return rgb, rgba


def test_predict_files_writes_paletted_labels_and_overlays(tmp_path, capsys):
  model, variables = tiny_unet()
  rgb, rgba = write_inputs(tmp_path / "in")
  (tmp_path / "in" / "notes.txt").write_text("not an image, not listed")
  out = tmp_path / "out"
  summary = predict_lib.predict_files(tmp_path / "in", out, variables=variables, model=model,
                                      class_names=NAMES, window=WINDOW, progress=False)
  assert summary["images"] == 4 and summary["skipped"] == []
  assert sorted(os.listdir(out)) == sorted(
      f"{s}{suffix}.png" for s in ("rgb", "gray", "rgba", "phone") for suffix in ("", "_overlay"))
  assert "4 images," in capsys.readouterr().out
  pal = visualize.palette(C)

  expected_inputs = {
      "rgb": rgb,
      "rgba": rgba[..., :3],
      "gray": np.repeat(np.asarray(Image.open(tmp_path / "in" / "gray.JPG"))[..., None], 3, -1),
      # EXIF orientation 6: the stored 24x44 image is shown rotated clockwise, 44x24.
      "phone": np.rot90(np.asarray(Image.open(tmp_path / "in" / "phone.jpeg")), k=-1),
  }
  for stem, image in expected_inputs.items():
    h, w = image.shape[:2]
    label_png = Image.open(out / f"{stem}.png")
    assert label_png.mode == "P" and label_png.size == (w, h)
    np.testing.assert_array_equal(np.asarray(label_png.getpalette()[:3 * C]).reshape(C, 3), pal)
    labels = np.asarray(label_png)
    np.testing.assert_array_equal(labels, jaxseg.predict(variables, model, image, window=WINDOW))
    assert labels.max() < C
    overlay = np.asarray(Image.open(out / f"{stem}_overlay.png").convert("RGB"))
    assert overlay.shape == (h, 2 * w, 3)
    np.testing.assert_array_equal(overlay[:, :w], image)
    blend = np.floor(0.5 * pal[labels].astype(np.float64) + 0.5 * image + 0.5)
    np.testing.assert_allclose(overlay[:, w:], blend, atol=1)
  assert (summary["outputs"][0][0], summary["outputs"][0][1]) == (
      str(out / "gray.png"), str(out / "gray_overlay.png"))  # sorted by name

  # Again into the same folder: outputs are overwritten; nothing temporary is left behind.
  before = (out / "rgb.png").read_bytes()
  predict_lib.predict_files(str(tmp_path / "in" / "rgb.png"), out, variables=variables,
                            model=model, class_names=NAMES, window=WINDOW, progress=False)
  assert (out / "rgb.png").read_bytes() == before
  assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_predict_files_glob_skips_unreadable_files_with_a_warning(tmp_path):
  model, variables = tiny_unet()
  write_inputs(tmp_path / "in")
  (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG not really")
  (tmp_path / "in" / "notes.txt").write_text("hello")
  with pytest.warns(UserWarning, match="not a readable image") as record:
    summary = predict_lib.predict_files(str(tmp_path / "in" / "*"), tmp_path / "out",
                                        variables=variables, model=model, class_names=NAMES,
                                        window=WINDOW, progress=False)
  assert summary["images"] == 4
  assert sorted(os.path.basename(p) for p in summary["skipped"]) == ["broken.png", "notes.txt"]
  assert sum("skipping" in str(w.message) for w in record) == 2
  assert not (tmp_path / "out" / "broken.png").exists()


def test_interrupted_write_leaves_no_partial_png(tmp_path, monkeypatch):
  model, variables = tiny_unet()
  Image.fromarray(random_image(16, 16)).save(tmp_path / "a.png")
  out = tmp_path / "out"

  def failing_save(self, fp, *args, **kwargs):
    fp.write(b"\x89PNG partial")
    raise KeyboardInterrupt("interrupted while writing")

  monkeypatch.setattr(Image.Image, "save", failing_save)
  with pytest.raises(KeyboardInterrupt):
    predict_lib.predict_files(tmp_path / "a.png", out, variables=variables, model=model,
                              class_names=NAMES, progress=False)
  assert os.listdir(out) == []


def _files_error_cases(tmp_path):
  only_text = tmp_path / "text_only"
  only_text.mkdir()
  (only_text / "a.txt").write_text("x")
  images = tmp_path / "images"
  images.mkdir()
  Image.fromarray(random_image(8, 8)).save(images / "a.png")
  Image.fromarray(random_image(8, 8)).save(images / "a.jpg")
  single = tmp_path / "single"
  single.mkdir()
  Image.fromarray(random_image(8, 8)).save(single / "b.png")
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "c.png").write_bytes(b"nope")
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  return [
      (only_text, tmp_path / "o1", ValueError, "no JPEG/PNG image in the folder"),
      (str(tmp_path / "*.jpeg"), tmp_path / "o2", FileNotFoundError, "matched no file"),
      (tmp_path / "missing", tmp_path / "o3", FileNotFoundError, "no such file"),
      (single, single, ValueError, "holds the input"),
      (single / "b.png", single, ValueError, "holds the input"),
      (images, tmp_path / "o4", ValueError, "would both write"),
      (single, a_file, ValueError, "existing file"),
      ([], tmp_path / "o5", ValueError, "empty"),
      (broken, tmp_path / "o6", ValueError, "none of the 1 input files"),
  ]


def test_predict_files_errors(tmp_path):
  model, variables = tiny_unet()
  for inputs, out, error, match in _files_error_cases(tmp_path):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      with pytest.raises(error, match=match):
        predict_lib.predict_files(inputs, out, variables=variables, model=model,
                                  class_names=NAMES, progress=False)
  single = tmp_path / "single"
  assert sorted(os.listdir(single)) == ["b.png"]  # the refused run wrote nothing there
  with pytest.raises(ValueError, match="at least 3 rows"):
    predict_lib.predict_files(single, tmp_path / "o7", variables=variables, model=model,
                              class_names=NAMES, palette=np.zeros((2, 3), np.uint8))


# ----------------------------------------------------------------------------- eval.py

def _run(script, *args):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, str(REPO / script), *args], cwd=str(REPO), env=env,
                        capture_output=True, text=True, timeout=600)


def test_eval_images_cli_refuses_instance_models_and_lone_flags(tmp_path):
  from jaxseg.configs import maskrcnn_shapes
  from jaxseg.train import loop
  workdir = tmp_path / "maskrcnn"
  loop.save_config(maskrcnn_shapes.get_config("smoke"), str(workdir))  # no checkpoint needed
  write_inputs(tmp_path / "in")
  r = _run("eval.py", f"--workdir={workdir}", f"--images={tmp_path / 'in'}",
           f"--out={tmp_path / 'out'}")
  assert r.returncode != 0 and "instance segmentation model" in r.stderr, r.stderr[-2000:]
  assert not (tmp_path / "out").exists()
  r = _run("eval.py", f"--workdir={workdir}", f"--out={tmp_path / 'out'}")
  assert r.returncode != 0 and "--images and --out go together" in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_eval_images_cli_end_to_end(tmp_path):
  workdir = tmp_path / "run"
  r = _run("train.py", f"--config={REPO}/jaxseg/configs/unet_shapes.py:smoke",
           f"--workdir={workdir}", f"--config.data_dir={tmp_path / 'tfds'}",
           "--config.num_steps=2")
  assert r.returncode == 0, r.stderr[-3000:]
  rgb, _ = write_inputs(tmp_path / "in")
  Image.fromarray(random_image(100, 130, seed=9)).save(tmp_path / "in" / "large.png")
  out = tmp_path / "out"
  r = _run("eval.py", f"--workdir={workdir}", f"--images={tmp_path / 'in'}", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "5 images," in r.stdout and "images/s" in r.stdout and "Mpx/s" in r.stdout
  assert "0 background" in r.stdout

  # The same labels from Python: the restored run, its training crop (64x64) as the window.
  from jaxseg.train import loop
  run = loop.restore_run(str(workdir))
  assert tuple(run.config.crop_size) == (64, 64)
  large = np.asarray(Image.open(tmp_path / "in" / "large.png"))
  for stem, image in (("rgb", rgb), ("large", large)):
    label_png = Image.open(out / f"{stem}.png")
    assert label_png.mode == "P" and label_png.size == image.shape[1::-1]
    np.testing.assert_array_equal(
        np.asarray(label_png), jaxseg.predict(run.variables, run.model, image, window=(64, 64)))
    assert Image.open(out / f"{stem}_overlay.png").size == (2 * image.shape[1], image.shape[0])

  # --window=whole: one pass over the image (other labels near the borders of large images).
  r = _run("eval.py", f"--workdir={workdir}", f"--images={tmp_path / 'in' / 'large.png'}",
           f"--out={tmp_path / 'whole'}", "--window=whole")
  assert r.returncode == 0, r.stderr[-3000:]
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "whole" / "large.png")),
                                jaxseg.predict(run.variables, run.model, large))

  for args, match in [
      ([f"--images={tmp_path / 'in'}", f"--out={tmp_path / 'in'}"], "holds the input"),
      ([f"--images={tmp_path / 'in'}", f"--out={out}", "--split=train"], "pass one"),
      ([f"--images={tmp_path / 'nothing' / '*.png'}", f"--out={out}"], "matched no file"),
      ([f"--images={tmp_path / 'in'}", f"--out={out}", "--window=3,x"], "--window must be"),
  ]:
    r = _run("eval.py", f"--workdir={workdir}", *args)
    assert r.returncode != 0 and match in r.stderr, (args, r.stderr[-2000:])

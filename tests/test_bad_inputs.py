"""The bad-input battery: what a tired user types, each with the error it must give.

Every row names the exception type and a message pattern that says what is wrong and, where
there is one, the fix. Rows that run the trainer check that the workdir was never created. The
detailed tables per area live next to the code (tests/models/test_models_input_values.py,
tests/losses/test_losses_label_values.py, tests/train/test_train_reliability.py); this one
walks the issue's list end to end through the public entry points.
"""
import os
import pathlib
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxseg
from jaxseg.configs import unet_shapes
from jaxseg.train import loop

REPO = pathlib.Path(__file__).resolve().parents[1]
C = 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def unet():
  model = jaxseg.models.build("unet", num_classes=C, features=4, depth=2)
  variables = model.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32), train=False)
  return model, variables


def _images(value=0.5, shape=(2, 16, 16, 3), dtype=np.float32):
  return np.full(shape, value, dtype)


def _mask(value=0, dtype=np.int32):
  m = np.zeros((2, 16, 16), dtype)
  m[0, 0, 0] = value
  return m


def _logits():
  return jnp.zeros((2, 16, 16, C))


class _Evil:
  def __reduce__(self):
    return (os.system, ("echo pwned > marker",))


# --- rows: (id, function of (unet, data_dir, tmp_path), exception, message) -------------------

def _train(change):
  def run(unet, data_dir, tmp_path):
    config = unet_shapes.get_config("smoke")
    config.data_dir = data_dir
    for key, value in change.items():
      node = config
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
    loop.train_and_evaluate(config, str(tmp_path / "run"))
  return run


def _apply(images):
  def run(unet, data_dir, tmp_path):
    model, variables = unet
    model.apply(variables, images, train=False)
  return run


def _predict(images):
  def run(unet, data_dir, tmp_path):
    model, variables = unet
    jaxseg.predict(variables, model, images)
  return run


def _boxes(classes, boxes):
  def run(unet, data_dir, tmp_path):
    from jaxseg.models.maskrcnn import check_target_values
    check_target_values({"boxes": np.asarray([[boxes]], np.float32),
                         "box_classes": np.asarray([[classes]], np.int32)}, (32, 32), 5)
  return run


def _jit_cross_entropy(label):
  def run(unet, data_dir, tmp_path):
    jax.jit(jaxseg.losses.cross_entropy)(_logits(), {"mask": jnp.asarray(_mask(label))}
                                          ).block_until_ready()
  return run


def _train_step_device_labels(unet, data_dir, tmp_path):
  model, _ = unet
  state = jaxseg.train.create_train_state(jax.random.key(0), model, optax.sgd(0.1), _images())
  step = jaxseg.train.make_train_step(jaxseg.losses.cross_entropy, num_classes=C)
  batch = jaxseg.train.shard_batch({"image": _images(), "mask": _mask(9)}, step.mesh)
  step(state, batch, jax.random.key(0))


def _restore_other_architecture(unet, data_dir, tmp_path):
  small = jaxseg.train.create_train_state(jax.random.key(0), unet[0], optax.sgd(0.1), _images())
  ck = jaxseg.train.Checkpointer(str(tmp_path / "ck"))
  ck.save(small, rng=jax.random.key(0), data_step=0)
  ck.close()
  wide = jaxseg.models.build("unet", num_classes=C, features=8, depth=2)
  other = jaxseg.train.create_train_state(jax.random.key(0), wide, optax.sgd(0.1), _images())
  ck = jaxseg.train.Checkpointer(str(tmp_path / "ck"), read_only=True)
  try:
    ck.restore(other)
  finally:
    ck.close()


def _pickled_callable(unet, data_dir, tmp_path):
  path = tmp_path / "evil.pth"
  path.write_bytes(pickle.dumps(_Evil()))
  os.chdir(tmp_path)
  jaxseg.convert.load_torch_file(str(path))


def _cli(*args, env=None):
  def run(unet, data_dir, tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "train.py"), *args,
                        f"--workdir={tmp_path / 'run'}"], cwd=str(tmp_path), capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, **(env or {})))
    assert r.returncode != 0
    raise RuntimeError(r.stderr[-2000:])
  return run


def _python(code):
  def run(unet, data_dir, tmp_path):
    r = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0
    raise RuntimeError(r.stderr[-2000:])
  return run


ROWS = [
    # configs and names
    ("unknown model", _train({"model": "unett"}), ValueError,
     r"unknown model 'unett' \(did you mean 'unet'\?\); valid: .*segnet"),
    ("unknown loss", _train({"loss": "cross_entropyy"}), ValueError,
     r"unknown loss 'cross_entropyy' \(did you mean 'cross_entropy'\?\)"),
    ("unknown optimizer", _train({"optimizer.name": "adamm"}), ValueError,
     r"unknown optimizer 'adamm' \(did you mean 'adamw'\?\); valid: sgd, adamw"),
    ("unknown model option", _train({"model_kwargs.featurs": 4}), TypeError, r"featurs"),
    ("unknown backbone", lambda *_: jaxseg.models.build("deeplabv3plus", num_classes=3,
                                                         backbone="resnet5"),
     ValueError, r"backbone 'resnet5' is not supported \(did you mean 'resnet50'\?\)"),
    ("unknown variant", lambda *_: unet_shapes.get_config("smok"), ValueError,
     r"unknown variant of unet_shapes .*'smok' \(did you mean 'smoke'\?\)"),
    ("unknown dataset", lambda *_: jaxseg.data.load("camvd", "train"), ValueError,
     r"unknown dataset 'camvd' \(did you mean 'camvid'\?\)"),
    ("config key typo (CLI)", _cli("--config.num_step=5"), RuntimeError,
     r"train.py: error: the config has no entry 'num_step' \(did you mean 'num_steps'\?\)"),
    ("missing config file (CLI)", _cli("--config=nope.py"), RuntimeError,
     r"config file nope.py not found; the recipes are .*unet_shapes"),
    ("batch_size 0", _train({"batch_size": 0}), ValueError,
     r"config.batch_size must be an integer >= 1, got 0"),
    ("negative checkpoint interval", _train({"checkpoint_every": -5}), ValueError,
     r"config.checkpoint_every must be an integer >= 1"),
    ("missing CamVid folder", _train({"dataset": "camvid",
                                      "builder_kwargs": {"manual_dir": "/nonexistent/camvid"}}),
     FileNotFoundError, r"(?s)camvid: folder not found: /nonexistent/camvid\n.*trainannot/"),
    ("eval of an empty workdir", lambda u, d, t: loop.evaluate_workdir(str(t)),
     FileNotFoundError, r"config.json not found: .* is not a jaxseg training workdir"),
    # images into model.apply / predict
    ("uint8 images", _apply(_images(128, dtype=np.uint8)), TypeError,
     r"floating point RGB \(float32 in \[0, 1\]\), got dtype uint8 .*/ 255"),
    ("0-255 float images", _apply(_images(200.0)), ValueError, r"0-255.*divide by 255"),
    ("NCHW images", _apply(_images(shape=(2, 3, 16, 16))), ValueError,
     r"channels.last.*transpose\(0, 2, 3, 1\)"),
    ("1-channel images", _apply(_images(shape=(2, 16, 16, 1))), ValueError, r"grayscale"),
    ("4-channel images", _apply(_images(shape=(2, 16, 16, 4))), ValueError, r"RGBA"),
    ("NaN images", _apply(_images(np.nan)), ValueError, r"NaN"),
    ("0-255 floats to predict", _predict(_images(200.0, shape=(16, 16, 3))), ValueError,
     r"divide by 255"),
    ("NCHW uint8 to predict", _predict(_images(3, shape=(3, 16, 16), dtype=np.uint8)),
     ValueError, r"transpose"),
    # labels
    ("label 7 of 3 classes in a jitted cross_entropy", _jit_cross_entropy(7), Exception,
     r"batch\['mask'\] has labels \[7\] outside \[0, 3\)"),
    ("label -1", lambda *_: jaxseg.losses.cross_entropy(_logits(), {"mask": _mask(-1)}),
     ValueError, r"labels \[-1\] outside \[0, 3\) \(255 is the only ignore value\)"),
    ("float masks", lambda *_: jaxseg.losses.cross_entropy(
        _logits(), {"mask": _mask(1).astype(np.float32)}), TypeError, r"integer class ids"),
    ("labels out of range on device arrays", _train_step_device_labels, ValueError,
     r"batch\['mask'\] has labels \[9\] outside \[0, 3\)"),
    # boxes and tags
    ("box_classes 0 for Mask R-CNN", _boxes(0, [2, 2, 9, 9]), ValueError,
     r"0 is the background class"),
    ("inverted box", _boxes(1, [9, 9, 2, 2]), ValueError, r"inverted"),
    ("box outside the image", _boxes(1, [2, 2, 40, 9]), ValueError, r"outside|inside"),
    ("tags of the wrong length", lambda *_: jaxseg.losses.image_level_loss(
        _logits(), {"image": _images(), "tags": np.ones((2, C + 2), np.float32)}),
     ValueError, r"tags"),
    # state, weights and checkpoints
    ("batch not divisible by the devices", _python(
        "import jax; jax.config.update('jax_num_cpu_devices', 2); import numpy as np, jaxseg; "
        "jaxseg.train.shard_batch({'image': np.zeros((3, 8, 8, 3), np.float32)}, "
        "jaxseg.train.make_mesh())"), RuntimeError,
     r"per-process batch size 3 is not divisible by the 2 local devices"),
    ("mismatched state dict", lambda u, d, t: jaxseg.convert.from_torch_state_dict(
        jaxseg.models.build("fcn_resnet50", num_classes=3), {"backbone.conv1.weight":
                                                             np.zeros((64, 3, 7, 7))},
        sample_input_shape=(1, 32, 32, 3)),
     ValueError, r"missing"),
    (".pth holding a pickled callable", _pickled_callable, Exception,
     r"refused to load: the pickle references the global '\w+\.system'"),
    ("checkpoint of another architecture", _restore_other_architecture,
     jaxseg.train.CheckpointMismatchError,
     r"holds another model or optimizer .* differ in shape"),
]


@pytest.mark.parametrize("make, exc, message", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_gives_a_clear_error(make, exc, message, unet, data_dir, tmp_path):
  cwd = os.getcwd()
  try:
    with pytest.raises(exc, match=message):
      make(unet, data_dir, tmp_path)
  finally:
    os.chdir(cwd)
  # No partial file: a run that fails to start never creates its workdir.
  assert not (tmp_path / "run").exists()
  assert not (tmp_path / "marker").exists()


def test_the_battery_is_the_issue_size():
  assert len(ROWS) >= 30


@pytest.mark.parametrize("mask", [np.full((2, 16, 16), 255, np.int32),
                                  np.zeros((2, 0, 16), np.int32)], ids=["all-ignore", "empty"])
def test_all_ignore_or_empty_masks_give_zero_loss_and_gradient(mask):
  logits = jnp.ones(mask.shape + (C,)) * jnp.arange(C)
  loss, grad = jax.value_and_grad(jaxseg.losses.cross_entropy)(logits, {"mask": mask})
  assert float(loss) == 0.0
  assert not np.any(np.asarray(grad))

"""jaxseg.export: StableHLO export of trained models, reloaded without jaxseg."""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseg
from jaxseg import export
from jaxseg.train import loop

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE = (32, 32)
NUM_CLASSES = 3


def _images(batch, seed=0, size=SIZE):
  return np.asarray(jax.random.uniform(jax.random.key(seed), (batch, *size, 3), jnp.float32))


def _trained_like(model, seed=0):
  """Random variables shaped like ``model.init``'s, BatchNorm statistics included (not the
  init-time 0/1, so eval mode matters). Built from ``jax.eval_shape``: compiling ``init`` of
  a backbone would cost more than the whole test on a small CPU."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *SIZE, 3)),
                                             train=False))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = str(path[-1].key), leaf.shape
    if name == "kernel":  # variance-preserving: fan-in is every axis but the last
      return rng.normal(0, 1 / np.sqrt(max(np.prod(shape[:-1]), 1)), shape)
    if name in ("scale", "var"):
      return 1 + 0.2 * rng.uniform(size=shape)
    return 0.1 * rng.normal(size=shape)  # biases, running means, anything else

  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.asarray(draw(path, leaf), leaf.dtype), shapes)


def _reference(model, variables, images):
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return np.asarray(apply(variables, images), np.float32)


@pytest.fixture(scope="module")
def unet():
  model = jaxseg.models.build("unet", num_classes=NUM_CLASSES, features=4, depth=2)
  return model, _trained_like(model)


@pytest.fixture(scope="module")
def symbolic_unet(unet):
  model, variables = unet
  return export.export_model(variables, model, image_size=SIZE)


def test_fixed_batch_matches_model_apply(unet):
  model, variables = unet
  exported = export.export_model(variables, model, image_size=SIZE, batch_size=2)
  (inp,), (out,) = exported.in_avals, exported.out_avals
  assert inp.shape == (2, *SIZE, 3) and inp.dtype == jnp.float32
  assert out.shape == (2, *SIZE, NUM_CLASSES) and out.dtype == jnp.float32
  assert exported.platforms == ("cpu",)
  images = _images(2)
  np.testing.assert_allclose(np.asarray(exported.call(images)),
                             _reference(model, variables, images), atol=1e-5)
  with pytest.raises(Exception, match="shape"):  # the batch size is part of the program
    exported.call(_images(3))


def test_symbolic_batch_takes_any_batch_size(unet, symbolic_unet):
  model, variables = unet
  (inp,) = symbolic_unet.in_avals
  assert jax.export.is_symbolic_dim(inp.shape[0]) and inp.shape[1:] == (*SIZE, 3)
  for batch, seed in ((1, 1), (3, 2)):
    images = _images(batch, seed)
    logits = np.asarray(symbolic_unet.call(images))
    assert logits.shape == (batch, *SIZE, NUM_CLASSES) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, _reference(model, variables, images), atol=1e-5)
  with pytest.raises(Exception, match="shape"):  # the spatial size is fixed
    symbolic_unet.call(_images(1, size=(64, 64)))


@pytest.mark.parametrize("name,kwargs", [
    ("deeplabv3plus", dict(backbone="mobilenet_v2", width_multiplier=0.25)),
    ("segnet", dict(width_multiplier=1 / 16)),  # argmax pooling / unpooling
    ("pspnet", dict(backbone="resnet18", width_multiplier=0.125)),  # adaptive pyramid pooling
])
def test_semantic_models_export_with_symbolic_batch(name, kwargs):
  model = jaxseg.models.build(name, num_classes=NUM_CLASSES, **kwargs)
  variables = _trained_like(model)
  exported = export.export_model(variables, model, image_size=SIZE)
  images = _images(2, 3)
  reference = _reference(model, variables, images)  # eval mode: each image on its own
  assert np.abs(reference).max() > 0.1  # the random weights neither vanish nor saturate
  np.testing.assert_allclose(np.asarray(exported.call(images)), reference, atol=1e-5)
  np.testing.assert_allclose(np.asarray(exported.call(images[1:])), reference[1:], atol=1e-5)


def test_bfloat16_export_of_a_float32_model(unet):
  model, variables = unet
  exported = export.export_model(variables, model, image_size=SIZE, batch_size=2,
                                 dtype="bfloat16")
  assert exported.out_avals[0].dtype == jnp.float32
  images = _images(2, 5)
  logits = np.asarray(exported.call(images))
  assert "bf16" in exported.mlir_module()  # the program computes in bfloat16...
  f32 = _reference(model, variables, images)
  # ...like the same architecture built in bfloat16 by the registry, the independent
  # reference (XLA may round differently with the weights folded in as constants: an ulp).
  bf16 = jaxseg.models.build("unet", num_classes=NUM_CLASSES, features=4, depth=2,
                             dtype="bfloat16")
  bf16_reference = _reference(bf16, variables, images)
  np.testing.assert_allclose(logits, bf16_reference, atol=4e-3 * np.abs(f32).max())
  assert np.abs(logits - f32).max() > 3 * np.abs(logits - bf16_reference).max()
  float32_export = export.export_model(variables, model, image_size=SIZE, batch_size=2)
  assert "bf16" not in float32_export.mlir_module()


def test_multi_platform_export_runs_on_cpu(unet):
  model, variables = unet
  exported = export.export_model(variables, model, image_size=SIZE, batch_size=1,
                                 platforms=("cpu", "cuda"))
  assert exported.platforms == ("cpu", "cuda")
  images = _images(1, 6)
  np.testing.assert_allclose(np.asarray(exported.call(images)),
                             _reference(model, variables, images), atol=1e-5)


def test_reloads_in_a_fresh_process_without_jaxseg(unet, symbolic_unet, tmp_path):
  model, variables = unet
  path = tmp_path / "model.jaxexport"
  export.save(symbolic_unet, str(path))
  images = _images(3, 7)
  np.save(tmp_path / "images.npy", images)
  child = textwrap.dedent("""
      import importlib.abc, sys

      class NoJaxseg(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
          if name.split(".")[0] == "jaxseg":
            raise ImportError("the loading side must not import " + name)

      sys.meta_path.insert(0, NoJaxseg())  # before the editable install's finder
      import jax, numpy as np
      with open("model.jaxexport", "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
      images = np.load("images.npy")
      np.save("logits3.npy", np.asarray(exported.call(images)))
      np.save("logits1.npy", np.asarray(exported.call(images[:1])))
      loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("jaxseg", "flax"))
      assert not loaded, loaded
      try:  # the guard works: without it the editable install would import jaxseg here
        import jaxseg
      except ImportError as e:
        assert "must not import jaxseg" in str(e), e
      else:
        raise AssertionError("jaxseg was importable despite the guard")
      print("child ok")
  """)
  # No PYTHONPATH entry that holds a jaxseg checkout; cwd is the empty tmp_path.
  paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      p for p in paths if p and not os.path.isdir(os.path.join(p, "jaxseg")))}
  proc = subprocess.run([sys.executable, "-c", child], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and "child ok" in proc.stdout, proc.stderr[-3000:]
  reference = _reference(model, variables, images)
  np.testing.assert_allclose(np.load(tmp_path / "logits3.npy"), reference, atol=1e-5)
  np.testing.assert_allclose(np.load(tmp_path / "logits1.npy"), reference[:1], atol=1e-5)
  # And jaxseg's own loader gives the same program back.
  np.testing.assert_allclose(np.asarray(export.load(str(path)).call(images)), reference,
                             atol=1e-5)


def test_save_never_leaves_a_partial_file(symbolic_unet, tmp_path, monkeypatch):
  path = tmp_path / "model.jaxexport"
  path.write_bytes(b"previous export")

  def broken_replace(src, dst):
    raise OSError("disk full")

  monkeypatch.setattr(os, "replace", broken_replace)
  with pytest.raises(OSError, match="disk full"):
    export.save(symbolic_unet, str(path))
  monkeypatch.undo()
  assert path.read_bytes() == b"previous export"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model.jaxexport"]
  export.save(symbolic_unet, str(path))
  assert path.read_bytes() == symbolic_unet.serialize()
  umask = os.umask(0)
  os.umask(umask)
  assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model.jaxexport"]
  with pytest.raises(FileNotFoundError, match="does not exist"):
    export.save(symbolic_unet, str(tmp_path / "missing" / "model.jaxexport"))
  with pytest.raises(TypeError, match="jax.export.Exported"):
    export.save(b"bytes", str(path))


def test_load_refuses_missing_and_corrupt_files(symbolic_unet, tmp_path):
  with pytest.raises(FileNotFoundError, match="no exported model"):
    export.load(str(tmp_path / "nothing.jaxexport"))
  empty = tmp_path / "empty.jaxexport"
  empty.write_bytes(b"")
  with pytest.raises(ValueError, match="empty"):
    export.load(str(empty))
  blob = bytes(symbolic_unet.serialize())
  for name, data in (("garbage", np.random.default_rng(0).bytes(4096)),
                     ("truncated", blob[:len(blob) // 3])):
    bad = tmp_path / f"{name}.jaxexport"
    bad.write_bytes(data)
    with pytest.raises(ValueError, match="not a valid serialised jax.export model"):
      export.load(str(bad))


class _DictOutput(nn.Module):
  @nn.compact
  def __call__(self, images, *, train):
    return {"logits": nn.Conv(2, (1, 1))(images)}


def test_bad_arguments_raise(unet):
  model, variables = unet
  for size in ((32,), (0, 32), (32.0, 32), "32", (32, -1), None):
    with pytest.raises(ValueError, match="image_size must be two positive ints"):
      export.export_model(variables, model, image_size=size)
  for batch in (0, -2, 2.5, True, "2"):
    with pytest.raises(ValueError, match="batch_size must be a positive int or None"):
      export.export_model(variables, model, image_size=SIZE, batch_size=batch)
  for platforms in ((), ("gpu",), ("cpu", "cpu"), 3):
    with pytest.raises(ValueError, match="platforms must be"):
      export.export_model(variables, model, image_size=SIZE, platforms=platforms)
  with pytest.raises(ValueError, match="dtype must be one of"):
    export.export_model(variables, model, image_size=SIZE, dtype="float16")
  with pytest.raises(ValueError, match="variables must be a mapping with 'params'"):
    export.export_model(variables["params"], model, image_size=SIZE)
  with pytest.raises(TypeError, match="flax.linen.Module"):
    export.export_model(variables, lambda v, x: x, image_size=SIZE)
  maskrcnn = jaxseg.models.build("maskrcnn", num_classes=3, backbone="resnet18")
  with pytest.raises(TypeError, match="instance model"):
    export.export_model({"params": {}}, maskrcnn, image_size=(64, 64))
  dict_model = _DictOutput()
  dict_vars = dict_model.init(jax.random.key(0), jnp.zeros((1, *SIZE, 3)), train=False)
  with pytest.raises(TypeError, match="not one logits array"):
    export.export_model(dict_vars, dict_model, image_size=SIZE)
  with pytest.raises(ValueError, match="no dtype field"):
    export.export_model(dict_vars, dict_model, image_size=SIZE, dtype="bfloat16")


def _run(args, cwd, timeout):
  proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.slow
def test_cli_exports_a_smoke_run(tmp_path):
  run = tmp_path / "run"
  _run([str(REPO_ROOT / "train.py"), "--config",
        str(REPO_ROOT / "jaxseg/configs/unet_shapes.py") + ":smoke", "--workdir", str(run),
        "--config.num_steps=2"], REPO_ROOT, 300)
  out = tmp_path / "model.jaxexport"
  stdout = _run(["-m", "jaxseg.export", "--workdir", str(run), "--out", str(out), "--batch",
                 "2"], tmp_path, 300)
  assert f"Wrote {out}" in stdout
  assert "images float32[2,64,64,3] -> logits float32[2,64,64,5]" in stdout, stdout
  exported = export.load(str(out))
  # The reference: the checkpoint restored by the training loop, applied as flax does.
  restored = loop.restore_run(str(run))
  assert restored.step == 2
  images = _images(2, 8, size=(64, 64))
  np.testing.assert_allclose(np.asarray(exported.call(images)),
                             _reference(restored.model, restored.variables, images), atol=1e-5)

  with pytest.raises(SystemExit):  # argparse: a usage error, before any work
    export.main(["--workdir", str(run), "--out", str(out), "--batch", "0"])
  # A run whose config names no image size needs one.
  sizeless = tmp_path / "sizeless"
  shutil.copytree(run, sizeless)
  config = json.loads((sizeless / "config.json").read_text())
  config["crop_size"] = None
  (sizeless / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="pass image_size"):
    export.export_workdir(str(sizeless), str(tmp_path / "x.jaxexport"))
  exported = export.export_workdir(str(sizeless), str(tmp_path / "x.jaxexport"),
                                   image_size=(32, 32))
  assert exported.in_avals[0].shape[1:] == (32, 32, 3)

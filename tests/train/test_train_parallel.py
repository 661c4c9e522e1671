"""Data parallelism: jit over a mesh, pmap, one device and two hosts agree.

Each strategy runs in its own subprocess because the number of (simulated CPU) devices is
fixed when JAX starts.
"""
import os
import pathlib
import subprocess
import sys

import numpy as np
import portpicker

WORKER = pathlib.Path(__file__).with_name("parallel_worker.py")
REPO = WORKER.parents[2]


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  env.pop("XLA_FLAGS", None)
  return env


def _run(mode, out, *extra, timeout=300):
  return subprocess.Popen([sys.executable, str(WORKER), mode, str(out), *map(str, extra)],
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc, timeout=300):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-3000:]


def _load(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def _assert_same(a, b, atol):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=0, err_msg=k)


def test_jit_mesh_pmap_and_single_device_agree(tmp_path):
  results = {}
  for mode in ("single", "jit", "pmap"):
    _wait(_run(mode, tmp_path / f"{mode}.npz"))
    results[mode] = _load(tmp_path / f"{mode}.npz")
  # The parameters moved (the comparison is not between three copies of the init).
  assert results["single"]["__losses__"][0] > results["single"]["__losses__"][-1]
  _assert_same(results["jit"], results["single"], atol=1e-5)
  _assert_same(results["pmap"], results["single"], atol=1e-5)


def test_two_hosts_train_like_one(tmp_path):
  port = portpicker.pick_unused_port()
  procs = [_run("multihost", tmp_path / f"host{i}.npz", i, 2, port) for i in range(2)]
  for p in procs:
    _wait(p)
  _wait(_run("single", tmp_path / "single.npz"))
  host0, host1 = _load(tmp_path / "host0.npz"), _load(tmp_path / "host1.npz")
  single = _load(tmp_path / "single.npz")
  _assert_same(host0, host1, atol=0)
  _assert_same(host0, single, atol=1e-5)


def _split(results):
  """{loss: {mode: {key: array}}} from the weak worker's flat ``loss|mode|key`` names."""
  out = {}
  for name, value in results.items():
    loss, mode, key = name.split("|", 2)
    out.setdefault(loss, {}).setdefault(mode, {})[key] = value
  return out


def test_pmap_weak_losses_equal_jit_on_unequal_shards(tmp_path):
  """Count-normalised losses divide by the global count under pmap too (global_mean).

  Shard 0 holds ~300 scribbled pixels, shard 1 six: the mean of per-shard means (the pmap
  step before) weights shard 1's six pixels like shard 0's three hundred.
  """
  _wait(_run("weak", tmp_path / "weak.npz"))
  results = _split(_load(tmp_path / "weak.npz"))
  assert set(results) == {"pce", "scribble", "boxinst"}
  for loss, by_mode in results.items():
    assert np.all(np.isfinite(by_mode["jit"]["__losses__"])), loss
    _assert_same(by_mode["pmap"], by_mode["jit"], atol=1e-5)
  # The same pmap run with each shard normalised by its own count differs (losses and
  # parameters): the comparison has teeth.
  pce = results["pce"]
  assert np.abs(pce["pmap_local_count"]["__losses__"] - pce["jit"]["__losses__"]).max() > 1e-2
  assert max(np.abs(pce["pmap_local_count"][k] - pce["jit"][k]).max()
             for k in pce["jit"] if k != "__losses__") > 1e-3


def test_maskrcnn_trains_the_same_on_one_device_a_mesh_and_pmap(tmp_path):
  """The instance model goes through the same step: a 2-device jit mesh and pmap equal one
  device. Sampling is deterministic here because pmap hands each device its own key; under
  jit the program sees the global batch and key, so random sampling is mesh-independent too."""
  _wait(_run("maskrcnn", tmp_path / "maskrcnn.npz"), timeout=600)
  by_mode = {}
  for key, value in _load(tmp_path / "maskrcnn.npz").items():
    mode, name = key.split("|", 1)
    by_mode.setdefault(mode, {})[name] = value
  losses = by_mode["single"]["__losses__"]
  assert np.all(np.isfinite(losses)) and losses[0] > losses[-1]
  _assert_same(by_mode["jit"], by_mode["single"], atol=1e-5)
  _assert_same(by_mode["pmap"], by_mode["single"], atol=1e-5)

"""Process set-up (``jaxseg.train.runtime``) and device prefetching (``prefetch_to_device``)."""
import os
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest

from jaxseg.train import runtime, sharding, step as step_lib


@pytest.mark.parametrize("sizes,cores,want", [
    ([16, 50], 2, 2), ([16, 50], 8, 2), ([16, 48], 8, 8), ([15, 45], 2, 1), ([12, 0], 4, 4),
    ([6, 9], 16, 3), ([8], 1, 1),
])
def test_auto_host_devices_is_the_largest_common_divisor_within_the_cores(sizes, cores, want):
  assert runtime.host_device_count(sizes, "auto", cores=cores) == want


def test_requested_host_devices_must_divide_the_batches():
  assert runtime.host_device_count([16, 50], 2, cores=1) == 2  # a request is taken as given
  with pytest.raises(ValueError, match="does not divide the batch size"):
    runtime.host_device_count([16, 50], 4)
  with pytest.raises(ValueError, match="'auto' or a positive int"):
    runtime.host_device_count([16], 0)


def test_set_host_device_count_refuses_after_backends_started():
  jax.devices()  # this test process's backends are up
  env = os.environ.get("XLA_FLAGS", "")
  if runtime.HOST_DEVICE_FLAG in env:
    pytest.skip("XLA_FLAGS already sets the host device count")
  with pytest.raises(RuntimeError, match="before JAX initialises"):
    runtime.set_host_device_count(2)


SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import jax, jax.numpy as jnp, ml_collections
    from jaxseg.train import runtime
    config = ml_collections.ConfigDict(dict(batch_size=6, eval_batch_size=4, host_devices="auto",
                                            compilation_cache=sys.argv[1]))
    out = runtime.configure(config)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    f(jnp.ones((64, 64))).block_until_ready()
    print(json.dumps({**out, "devices": jax.device_count(), "platform": jax.default_backend()}))
""")


def run_script(cache_dir):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-c", SCRIPT, str(cache_dir)], env=env, check=True,
                       capture_output=True, text=True, timeout=300)
  import json
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_configure_splits_the_cpu_and_fills_the_compilation_cache(tmp_path):
  cache = tmp_path / "xla"
  got = run_script(cache)
  want = runtime.host_device_count([6, 4], "auto")
  assert got["host_devices"] == want
  if got["platform"] == "cpu":
    assert got["devices"] == want
  assert got["compilation_cache"] == str(cache)
  entries = os.listdir(cache)
  assert entries, "the compiled program was not written to the persistent cache"
  # A second process finds the program instead of adding it again.
  run_script(cache)
  assert sorted(os.listdir(cache)) == sorted(entries)


def test_empty_cache_path_disables_the_cache():
  config = ml_collections.ConfigDict(dict(compilation_cache=""))
  assert runtime.enable_compilation_cache(config.compilation_cache) is None


def test_prefetch_to_device_keeps_order_checks_host_batches_and_shards():
  mesh = sharding.make_mesh()
  n = jax.device_count()
  batches = [{"image": np.full((2 * n, 4, 4, 3), i, np.float32),
              "mask": np.full((2 * n, 4, 4), i % 3, np.int32)} for i in range(5)]
  seen = []
  def check(batch):
    seen.append(float(batch["image"][0, 0, 0, 0]))

  out = list(sharding.prefetch_to_device(batches, mesh, size=2, check=check))
  assert [float(b["image"][0, 0, 0, 0]) for b in out] == list(range(5))
  assert seen == list(range(5))
  assert all(b["mask"].sharding == sharding.data_sharding(mesh) for b in out)

  bad = batches[:2] + [{"image": batches[0]["image"], "mask": np.full((2 * n, 4, 4), 7, np.int32)}]
  it = sharding.prefetch_to_device(bad, mesh, size=1,
                                   check=lambda b: step_lib.validate_batch(b, num_classes=3))
  next(it)
  with pytest.raises(ValueError, match=r"batch\['mask'\] has labels \[7\]"):
    next(it)
  with pytest.raises(ValueError, match="prefetch size"):
    next(sharding.prefetch_to_device(batches, mesh, size=0))

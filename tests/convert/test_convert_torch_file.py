"""load_torch_file: reads torch.save files (zip and legacy) without torch, refuses code."""
import io
import os
import pickle
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from jaxseg.convert import TorchFileError, load_torch_file

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

FORMATS = ["zip", "legacy"]


def _save(obj, path, fmt):
  torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))
  return path


def _odd_tensors():
  """Tensors whose layout or dtype a naive reader gets wrong."""
  g = torch.Generator().manual_seed(1)
  base = torch.randn(6, 8, generator=g)
  return {
      # views into a bigger storage: non-zero storage offset and/or strides
      "odd.slice": base[2:, 1::2],
      "odd.row": base[3],
      "odd.transposed": torch.randn(3, 5, generator=g).t(),
      "odd.permuted": torch.randn(2, 3, 4, generator=g).permute(2, 0, 1),
      "odd.expanded": torch.arange(3.0).expand(4, 3),  # stride 0
      "odd.scalar": torch.tensor(3.25),
      "odd.empty": torch.zeros(0, 3),
      "odd.int64": torch.arange(-5, 7, dtype=torch.int64).reshape(3, 4),
      "odd.int32": torch.arange(10, dtype=torch.int32)[::3],
      "odd.int8": torch.tensor([-128, 0, 127], dtype=torch.int8),
      "odd.uint8": torch.tensor([0, 200, 255], dtype=torch.uint8),
      "odd.uint16": torch.tensor([0, 1, 65535], dtype=torch.uint16),  # _rebuild_tensor_v3
      "odd.bool": torch.tensor([[True, False], [False, True]]),
      "odd.float16": torch.randn(4, 3, generator=g).half().t(),
      "odd.float64": torch.randn(5, generator=g, dtype=torch.float64),
      "odd.complex64": torch.randn(3, generator=g, dtype=torch.complex64),
  }


def _reference_state_dict():
  torch.manual_seed(0)
  sd = dict(torchvision.models.resnet18(weights=None).state_dict())
  sd.update(_odd_tensors())
  return sd


@pytest.fixture(scope="module")
def reference():
  return _reference_state_dict()


def _assert_same(arrays, reference):
  assert list(arrays) == list(reference)
  for name, t in reference.items():
    want = t.numpy()
    got = arrays[name]
    assert got.dtype == want.dtype, name
    assert got.shape == want.shape, name
    assert np.array_equal(got, want), name
    assert got.flags.c_contiguous and got.flags.writeable and got.flags.owndata, name


@pytest.mark.parametrize("fmt", FORMATS)
def test_resnet18_and_odd_tensors_match_exactly(tmp_path, reference, fmt):
  path = _save(reference, tmp_path / "model.pth", fmt)
  _assert_same(load_torch_file(path), reference)


@pytest.mark.parametrize("fmt", FORMATS)
def test_ordered_dict_state_dict_and_parameters(tmp_path, fmt):
  """A module's own state_dict (OrderedDict with _metadata) and raw nn.Parameters."""
  torch.manual_seed(0)
  model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
  path = _save(model.state_dict(), tmp_path / "sd.pth", fmt)
  _assert_same(load_torch_file(path), model.state_dict())
  params = dict(model.named_parameters())  # _rebuild_parameter
  path = _save(params, tmp_path / "params.pth", fmt)
  _assert_same(load_torch_file(path), {k: v.detach() for k, v in params.items()})


@pytest.mark.parametrize("fmt", FORMATS)
def test_bfloat16(tmp_path, fmt):
  t = torch.randn(3, 4).to(torch.bfloat16)[:, 1:]
  got = load_torch_file(_save({"w": t}, tmp_path / "bf16.pth", fmt))["w"]
  assert str(got.dtype) == "bfloat16"
  np.testing.assert_array_equal(got.astype(np.float32), t.float().numpy())


def test_zip_with_any_top_level_folder_and_big_endian(tmp_path):
  """The folder inside the zip is the writer's choice; byteorder 'big' is honoured."""
  t = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7
  buf = io.BytesIO()
  torch.save({"w": t, "i": torch.arange(3)}, buf)
  src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
  dst_path = tmp_path / "renamed.pth"
  with zipfile.ZipFile(dst_path, "w") as dst:
    for name in src.namelist():
      data = src.read(name)
      rel = name.split("/", 1)[1]
      if rel == "byteorder":
        data = b"big"
      elif rel.startswith("data/"):
        # storage 0 is w (float32), 1 is i (int64): store them big endian
        dtype = np.float32 if rel == "data/0" else np.int64
        data = np.frombuffer(data, dtype).byteswap().tobytes()
      dst.writestr("some_other_name/" + rel, data)
  got = load_torch_file(dst_path)
  np.testing.assert_array_equal(got["w"], t.numpy())
  np.testing.assert_array_equal(got["i"], np.arange(3))
  assert got["w"].dtype == np.float32


# ---- refusing anything that is not tensors -------------------------------------------

class _Evil:
  def __init__(self, fn, arg):
    self.fn, self.arg = fn, arg

  def __reduce__(self):
    return (self.fn, (self.arg,))


@pytest.mark.parametrize("fmt", FORMATS)
def test_pickled_os_system_is_refused_and_never_runs(tmp_path, monkeypatch, fmt):
  monkeypatch.chdir(tmp_path)
  payload = {"conv.weight": torch.zeros(2, 2), "x": _Evil(os.system, "echo pwned > marker")}
  path = _save(payload, tmp_path / "evil.pth", fmt)
  global_name = f"{os.system.__module__}.system"  # posix.system on Linux
  with pytest.raises(TorchFileError, match=rf"refused to load: the pickle references the global "
                                           rf"'{re.escape(global_name)}'") as err:
    load_torch_file(path)
  assert global_name in str(err.value)
  assert str(path) in str(err.value)
  assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_other_globals_are_refused(tmp_path, fmt):
  path = _save({"x": _Evil(eval, "1 + 1")}, tmp_path / "eval.pth", fmt)
  # protocol 2 spells builtins the Python 2 way
  with pytest.raises(TorchFileError, match=r"'(__builtin__|builtins)\.eval'"):
    load_torch_file(path)
  # a tensor subclass is rebuilt through torch._tensor._rebuild_from_type_v2
  # and another torch global: refused, not guessed at
  path = _save({"x": torch.nn.Linear(2, 2)}, tmp_path / "module.pth", fmt)
  with pytest.raises(TorchFileError, match="torch.nn.modules.linear.Linear"):
    load_torch_file(path)


def test_plain_pickle_with_os_system_is_refused(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  path = tmp_path / "plain.pkl"
  path.write_bytes(pickle.dumps(_Evil(os.system, "echo pwned > marker")))
  with pytest.raises(TorchFileError, match=f"{os.system.__module__}.system"):
    load_torch_file(path)
  assert not (tmp_path / "marker").exists()


def test_pickle_cannot_rebind_what_the_loader_hands_out(tmp_path):
  """BUILD on an allowed global (here: FloatStorage's dtype := 1) fails; later loads are intact."""
  # PROTO 2, GLOBAL torch.FloatStorage, (None, {"dtype": 1}), BUILD, STOP
  crafted = (b"\x80\x02ctorch\nFloatStorage\nN}X\x05\x00\x00\x00dtypeK\x01s\x86b.")
  path = tmp_path / "crafted.pth"
  path.write_bytes(crafted)
  # BUILD tries to set the stand-in's read-only field; the wording depends on the Python version.
  with pytest.raises(TorchFileError, match=r"crafted\.pth: not a PyTorch file .*: "
                                           r"(can't set attribute|.*has no setter)"):
    load_torch_file(path)
  t = torch.arange(6, dtype=torch.float32)
  got = load_torch_file(_save({"w": t}, tmp_path / "ok.pth", "legacy"))["w"]
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, t.numpy())


# ---- damaged, missing and wrapped files ------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("fraction", [0.0005, 0.3, 0.9, 0.9999])
def test_truncated_file_is_a_value_error(tmp_path, reference, fmt, fraction):
  data = _save(reference, tmp_path / "full.pth", fmt).read_bytes()
  path = tmp_path / "cut.pth"
  path.write_bytes(data[:max(1, int(len(data) * fraction))])
  with pytest.raises(ValueError, match=str(path)):
    load_torch_file(path)


def test_garbage_and_empty_files_are_value_errors(tmp_path):
  rng = np.random.default_rng(0)
  for name, data in [("empty.pth", b""), ("noise.pth", rng.bytes(5000)),
                     ("text.pth", b"not a checkpoint\n" * 10),
                     ("fakezip.pth", b"PK\x03\x04" + rng.bytes(200))]:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ValueError, match=str(path)):
      load_torch_file(path)


def test_missing_file(tmp_path):
  path = tmp_path / "nope.pth"
  with pytest.raises(FileNotFoundError, match=str(path)):
    load_torch_file(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_wrapped_checkpoint_needs_key(tmp_path, fmt):
  sd = {"fc.weight": torch.ones(2, 3), "fc.bias": torch.zeros(2)}
  path = _save({"state_dict": sd, "epoch": 7, "arch": "tiny"}, tmp_path / "ckpt.pth", fmt)
  with pytest.raises(TorchFileError, match="key='state_dict'"):
    load_torch_file(path)
  _assert_same(load_torch_file(path, key="state_dict"), sd)
  with pytest.raises(TorchFileError, match="no top-level entry 'model'"):
    load_torch_file(path, key="model")


def test_non_mapping_top_level(tmp_path):
  path = _save([torch.ones(2)], tmp_path / "list.pth", "zip")
  with pytest.raises(TorchFileError, match="not a state dict"):
    load_torch_file(path)
  path = _save(torch.ones(2), tmp_path / "tensor.pth", "zip")
  with pytest.raises(TorchFileError, match="single tensor"):
    load_torch_file(path)


def test_loader_never_imports_torch(tmp_path):
  path = _save({"w": torch.ones(2, 2)}, tmp_path / "w.pth", "zip")
  legacy = _save({"w": torch.ones(2, 2)}, tmp_path / "w_legacy.pth", "legacy")
  code = ("import sys; from jaxseg.convert.torch_file import load_torch_file; "
          f"load_torch_file({str(path)!r}); load_torch_file({str(legacy)!r}); "
          "assert 'torch' not in sys.modules, 'torch was imported'")
  repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  subprocess.run([sys.executable, "-c", code], check=True, cwd=repo_root)

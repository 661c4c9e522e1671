"""Reads PyTorch ``.pth``/``.pt`` state dicts into NumPy arrays without torch.

``torch.save`` writes a pickle whose tensors point at raw storages kept beside
it. Unpickling with the standard ``pickle`` module would call whatever globals
the file names (``os.system`` included), so this reader uses an unpickler whose
``find_class`` only knows the handful of names a state dict of tensors needs and
maps each to a local, data-only stand-in. Nothing from the file is imported or
executed; any other global is refused before anything is called.

Two on-disk formats are read:

* zip (``torch.save`` default since 1.6): ``<dir>/data.pkl`` plus one raw
  storage per ``<dir>/data/<key>``, byte order given by ``<dir>/byteorder``
  (little when absent). ``<dir>`` is whatever name the writer chose.
* legacy (``_use_new_zipfile_serialization=False`` and files from torch < 1.6,
  e.g. most torchvision ImageNet weights): pickles of the magic number, the
  protocol version and a sys-info dict, then the main pickle, then a pickled
  list of storage keys, then for each key an int64 element count followed by
  that many elements, always little endian.

The older tar container (torch < 0.4) is not read.
"""
import collections
import io
import os
import pickle
import sys
import zipfile
from typing import Any, BinaryIO, Callable, Dict, Mapping, NamedTuple, Optional

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch's typed storage classes -> element dtype. ``torch.cuda.*Storage`` are
# accepted too: files saved from a GPU by old torch name them, and only the
# bytes are read here.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}

# torch dtypes as globals: ``_rebuild_tensor_v3`` (dtypes without a typed
# storage class, e.g. uint16 or float8) names the tensor's dtype this way.
_TORCH_DTYPES = {
    "float64": np.float64, "float32": np.float32, "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16, "int64": np.int64, "int32": np.int32, "int16": np.int16,
    "int8": np.int8, "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32,
    "uint64": np.uint64, "bool": np.bool_, "complex64": np.complex64,
    "complex128": np.complex128, "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2, "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
    "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
}


class TorchFileError(ValueError):
  """A file that is not a readable state dict: corrupt, truncated or holding more than tensors."""


# Everything a pickle can reach is immutable. Its BUILD opcode sets attributes on
# whatever is on its stack: a mutable stand-in from find_class (shared by every
# load in the process) would let one file change how later files are read, and
# a mutable record would dodge the checks made when it was built.
class _StorageType(NamedTuple):
  """Stand-in for a torch storage class: only its element dtype matters."""
  name: str
  dtype: np.dtype


class _Dtype(NamedTuple):
  """Stand-in for a ``torch.<dtype>`` global."""
  name: str
  dtype: np.dtype


class _Call(NamedTuple):
  """An allowed callable; a tuple, so a pickle cannot rebind it (see above)."""
  fn: Callable

  def __call__(self, *args):
    return self.fn(*args)


class _Storage(NamedTuple):
  """A storage record: bytes [byte_offset, byte_offset + nbytes) of storage ``key``."""
  key: str
  dtype: np.dtype
  byte_offset: int
  nbytes: int


class _Tensor(NamedTuple):
  """A tensor record, materialised once the storages' bytes are known.

  ``offset``, ``shape`` and ``stride`` count elements of ``dtype``, as in torch.
  """
  storage: _Storage
  offset: int
  shape: tuple
  stride: tuple
  dtype: np.dtype


def _int_tuple(value, what: str):
  if not isinstance(value, (tuple, list)) or not all(
      isinstance(v, int) and not isinstance(v, bool) for v in value):
    raise TorchFileError(f"tensor {what} is not a tuple of ints: {value!r}")
  return tuple(value)


def _tensor(storage, offset, size, stride, dtype=None) -> _Tensor:
  if not isinstance(storage, _Storage):
    raise TorchFileError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
  if not isinstance(offset, int) or offset < 0:
    raise TorchFileError(f"bad storage offset {offset!r}")
  shape, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
  if len(shape) != len(stride) or any(s < 0 for s in shape + stride):
    raise TorchFileError(f"bad tensor geometry: size {shape}, stride {stride}")
  return _Tensor(storage, offset, shape, stride, storage.dtype if dtype is None else dtype)


# The rebuild functions torch pickles tensors with, as data-only stand-ins.
# Arguments after the geometry (requires_grad, backward hooks, metadata) are
# autograd bookkeeping with no bearing on the values.
def _rebuild_tensor(storage, storage_offset, size, stride):
  return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
  del requires_grad, backward_hooks, metadata
  if not isinstance(dtype, _Dtype):
    raise TorchFileError(f"tensor dtype {dtype!r} is not a torch dtype")
  return _tensor(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  if not isinstance(data, _Tensor):
    raise TorchFileError(f"parameter rebuilt from {type(data).__name__}, not a tensor")
  return data


def _size(*args):
  # torch.Size(seq) -> a tuple of ints
  if len(args) != 1:
    raise TorchFileError("torch.Size takes one sequence")
  return _int_tuple(tuple(args[0]), "torch.Size")


def _allowed_globals() -> Dict[tuple, Any]:
  allowed = {
      # a C type: its attributes cannot be set, so it is safe to hand out as is
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("torch._utils", "_rebuild_tensor"): _Call(_rebuild_tensor),
      ("torch._utils", "_rebuild_tensor_v2"): _Call(_rebuild_tensor_v2),
      ("torch._utils", "_rebuild_tensor_v3"): _Call(_rebuild_tensor_v3),
      ("torch._utils", "_rebuild_parameter"): _Call(_rebuild_parameter),
      ("torch._utils", "_rebuild_parameter_with_state"): _Call(_rebuild_parameter),
      ("torch", "Size"): _Call(_size),
      ("torch", "UntypedStorage"): _StorageType("UntypedStorage", np.dtype(np.uint8)),
      ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", np.dtype(np.uint8)),
  }
  for name, dtype in _STORAGE_DTYPES.items():
    allowed[("torch", name)] = _StorageType(name, np.dtype(dtype))
    allowed[("torch.cuda", name)] = _StorageType(name, np.dtype(dtype))
  for name, dtype in _TORCH_DTYPES.items():
    allowed[("torch", name)] = _Dtype(name, np.dtype(dtype))
  return allowed


_ALLOWED = _allowed_globals()


class _Unpickler(pickle.Unpickler):
  """Unpickler that resolves only ``_ALLOWED`` globals and records storages."""

  def __init__(self, file: BinaryIO, path: str, storages: Optional[Dict[str, _Storage]] = None):
    super().__init__(file)
    self._path = path
    self._storages = storages

  def find_class(self, module: str, name: str):
    obj = _ALLOWED.get((module, name))
    if obj is None:
      raise TorchFileError(
          f"{self._path}: refused to load: the pickle references the global "
          f"'{module}.{name}', which a state dict of tensors never needs; nothing from "
          "the file was executed. Only tensors, storages and (Ordered)dicts are read.")
    return obj

  def persistent_load(self, pid):
    if self._storages is None:
      raise TorchFileError(f"{self._path}: unexpected storage reference in a header pickle")
    # ('storage', storage_type, key, location, numel[, view_metadata]); old
    # writers may have stored the ASCII fields as bytes.
    if not isinstance(pid, tuple) or len(pid) not in (5, 6):
      raise TorchFileError(f"{self._path}: unsupported persistent id {pid!r}")
    typename, storage_type, key, _location, numel = pid[:5]
    view = pid[5] if len(pid) == 6 else None
    if isinstance(typename, bytes):
      typename = typename.decode("ascii")
    if typename != "storage":
      raise TorchFileError(f"{self._path}: refused to load: persistent record of kind "
                           f"{typename!r} (only tensor storages are read)")
    if not isinstance(storage_type, _StorageType):
      raise TorchFileError(f"{self._path}: storage type {storage_type!r} is not a torch storage")
    key = key.decode("ascii") if isinstance(key, bytes) else str(key)
    if not isinstance(numel, int) or numel < 0:
      raise TorchFileError(f"{self._path}: bad storage size {numel!r}")
    itemsize = storage_type.dtype.itemsize
    root = self._storages.get(key)
    if root is None:
      root = self._storages[key] = _Storage(key, storage_type.dtype, 0, numel * itemsize)
    elif root.dtype != storage_type.dtype:
      raise TorchFileError(f"{self._path}: storage {key} is read as both {root.dtype} and "
                           f"{storage_type.dtype}")
    if view is None:
      return root
    # Legacy files from old torch can reference a slice of a storage:
    # (view_key, element offset, element count).
    _view_key, offset, count = view
    if not (isinstance(offset, int) and isinstance(count, int) and offset >= 0 and count >= 0):
      raise TorchFileError(f"{self._path}: bad storage view {view!r}")
    return _Storage(key, storage_type.dtype, offset * itemsize, count * itemsize)


def _materialise(t: _Tensor, buffers: Mapping[str, memoryview], swap: bool) -> np.ndarray:
  """Copies a tensor record out of its storage bytes: a C-contiguous, owned array."""
  raw = buffers[t.storage.key]
  start, stop = t.storage.byte_offset, t.storage.byte_offset + t.storage.nbytes
  if stop > len(raw):
    raise TorchFileError(f"storage {t.storage.key} has {len(raw)} bytes, a view needs {stop}")
  raw = raw[start:stop]
  dtype = t.dtype
  n_elems = len(raw) // dtype.itemsize
  if 0 in t.shape:
    return np.empty(t.shape, dtype)
  # Last element the view touches, so a bad geometry cannot read past the storage.
  last = t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.stride))
  if last >= n_elems:
    raise TorchFileError(f"tensor of size {t.shape}, stride {t.stride}, offset {t.offset} "
                         f"reaches element {last} of a {n_elems}-element storage "
                         f"{t.storage.key}")
  flat = np.frombuffer(raw, dtype=dtype, count=n_elems)
  view = np.lib.stride_tricks.as_strided(
      flat[t.offset:], shape=t.shape, strides=tuple(s * dtype.itemsize for s in t.stride),
      writeable=False)
  out = np.array(view, dtype=dtype, order="C", copy=True)
  if swap and dtype.itemsize > 1:
    if dtype.kind == "c":  # real and imaginary parts are swapped separately
      out.view(np.dtype(f"f{dtype.itemsize // 2}")).byteswap(inplace=True)
    else:
      out.byteswap(inplace=True)
  return out


def _read_zip(f: BinaryIO, path: str):
  with zipfile.ZipFile(f) as zf:
    names = zf.namelist()
    pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
      raise TorchFileError(f"{path}: zip archive without exactly one <dir>/data.pkl "
                           f"(found {pkls or 'none'}); not a torch.save file")
    prefix = pkls[0][:-len("data.pkl")]
    storages: Dict[str, _Storage] = {}
    obj = _Unpickler(io.BytesIO(zf.read(pkls[0])), path, storages).load()
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = zf.read(prefix + "byteorder").decode("ascii").strip()
      if byteorder not in ("little", "big"):
        raise TorchFileError(f"{path}: unknown byte order {byteorder!r}")
    buffers = {}
    for key, storage in storages.items():
      member = f"{prefix}data/{key}"
      if member not in names:
        raise TorchFileError(f"{path}: storage record {member} is missing")
      data = zf.read(member)
      if len(data) < storage.nbytes:
        raise TorchFileError(f"{path}: storage {member} has {len(data)} bytes, "
                             f"{storage.nbytes} expected (truncated?)")
      buffers[key] = memoryview(data)
  return obj, buffers, byteorder != sys.byteorder


def _read_legacy(f: BinaryIO, path: str):
  try:
    magic = _Unpickler(f, path).load()
  except TorchFileError:
    raise
  except Exception as e:
    raise TorchFileError(f"{path}: not a PyTorch file (neither a zip archive nor a legacy "
                         f"torch.save pickle): {e}") from e
  if magic != _LEGACY_MAGIC:
    raise TorchFileError(f"{path}: not a PyTorch file (no torch.save magic number)")
  protocol = _Unpickler(f, path).load()
  if protocol != _LEGACY_PROTOCOL:
    raise TorchFileError(f"{path}: unsupported legacy protocol version {protocol!r}")
  sys_info = _Unpickler(f, path).load()
  if not isinstance(sys_info, dict):
    raise TorchFileError(f"{path}: bad legacy header {sys_info!r}")
  storages: Dict[str, _Storage] = {}
  obj = _Unpickler(f, path, storages).load()
  keys = _Unpickler(f, path).load()
  if not isinstance(keys, list):
    raise TorchFileError(f"{path}: bad storage key list {keys!r}")
  buffers = {}
  file_size = os.fstat(f.fileno()).st_size
  for key in keys:
    key = key.decode("ascii") if isinstance(key, bytes) else str(key)
    if key not in storages:
      raise TorchFileError(f"{path}: storage {key} is listed but never referenced")
    header = f.read(8)
    if len(header) < 8:
      raise TorchFileError(f"{path}: file ends before storage {key} (truncated)")
    # The element count and the data are little endian whatever the writer's
    # machine was (torch swaps on big-endian hosts when writing).
    count = int.from_bytes(header, "little", signed=True)
    nbytes = count * storages[key].dtype.itemsize
    if count < 0 or nbytes < storages[key].nbytes:
      raise TorchFileError(f"{path}: storage {key} holds {count} elements, the pickle "
                           f"needs {storages[key].nbytes // storages[key].dtype.itemsize}")
    # Checked before reading so a corrupt count cannot ask for a huge buffer.
    if nbytes > file_size - f.tell():
      raise TorchFileError(f"{path}: file ends inside storage {key} (truncated): "
                           f"{file_size - f.tell()} of {nbytes} bytes")
    data = f.read(nbytes)
    if len(data) < nbytes:
      raise TorchFileError(f"{path}: file ends inside storage {key} (truncated): "
                           f"{len(data)} of {nbytes} bytes")
    buffers[key] = memoryview(data)
  missing = set(storages) - set(buffers)
  if missing:
    raise TorchFileError(f"{path}: storages {sorted(missing)} have no data")
  return obj, buffers, sys.byteorder != "little"


def _describe(value) -> str:
  if isinstance(value, _Tensor):
    return f"tensor {value.shape}"
  if isinstance(value, Mapping):
    return f"mapping with keys {list(value)[:8]}"
  return type(value).__name__


def _select(obj, key: Optional[str], path: str) -> Mapping[str, _Tensor]:
  if key is not None:
    if not isinstance(obj, Mapping) or key not in obj:
      top = list(obj)[:20] if isinstance(obj, Mapping) else type(obj).__name__
      raise TorchFileError(f"{path}: no top-level entry {key!r} (top level: {top})")
    obj = obj[key]
  if isinstance(obj, _Tensor):
    raise TorchFileError(f"{path}: holds a single tensor {obj.shape}, not a state dict")
  if not isinstance(obj, Mapping):
    raise TorchFileError(f"{path}: holds a {type(obj).__name__}, not a state dict "
                         "(a mapping of names to tensors)")
  bad = {k: v for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, _Tensor))}
  if bad:
    # The usual case: a training checkpoint wrapping the weights. Name the entry
    # to pick rather than guessing which of several (model, ema, ...) is meant.
    nested = [k for k, v in obj.items() if isinstance(v, Mapping) and v
              and all(isinstance(t, _Tensor) for t in v.values())]
    hint = (f"; its tensors are under {nested}: call load_torch_file(path, key={nested[0]!r})"
            if nested else "")
    detail = ", ".join(f"{k!r}: {_describe(v)}" for k, v in list(bad.items())[:8])
    raise TorchFileError(f"{path}: not a flat state dict of tensors ({detail}){hint}")
  return obj


def load_torch_file(path, *, key: Optional[str] = None) -> Dict[str, np.ndarray]:
  """Reads a ``torch.save``'d state dict into NumPy arrays, without importing torch.

  Args:
    path: a ``.pth``/``.pt`` file in the zip or the legacy format.
    key: for a checkpoint that wraps the weights (``{"state_dict": {...},
      "epoch": ...}``), the top-level entry to read. Nothing is unwrapped
      unless asked: the error for such a file names the entry to pass.

  Returns:
    ``{name: array}`` in file order; each array is a C-contiguous, writeable
    copy with the tensor's shape and dtype (``bfloat16`` and ``float8`` via
    ``ml_dtypes``), equal to ``tensor.numpy()``. 0-d tensors give 0-d arrays.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    TorchFileError (a ValueError): the file is truncated or corrupt, is not a
      state dict, or its pickle names any global beyond tensors and storages
      (e.g. ``posix.system``); the message names the file and the global.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no such PyTorch file: {path}")
  with open(path, "rb") as f:
    head = f.read(4)
    f.seek(0)
    if not head:
      raise TorchFileError(f"{path}: empty file")
    try:
      if head.startswith(b"PK"):
        obj, buffers, swap = _read_zip(f, path)
      else:
        obj, buffers, swap = _read_legacy(f, path)
    except TorchFileError as e:
      # checks made while unpickling do not know the file name
      if not str(e).startswith(path):
        raise TorchFileError(f"{path}: {e}") from None
      raise
    except Exception as e:  # any parse failure means a damaged file; keep the cause
      raise TorchFileError(f"{path}: truncated or corrupt PyTorch file "
                           f"({type(e).__name__}: {e})") from e
  tensors = _select(obj, key, path)
  try:
    return {name: _materialise(t, buffers, swap) for name, t in tensors.items()}
  except TorchFileError as e:
    raise TorchFileError(f"{path}: {e}") from None

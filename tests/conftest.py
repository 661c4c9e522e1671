"""Shared pytest fixtures.

Real datasets live outside the repo (research licences). Tests find them through
``JAXSEG_SHARED_DATA`` (default ``../shared/data`` next to the checkout) and skip with a
reason when they are absent.
"""
import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def shared_data_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("JAXSEG_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture
def camvid_dir():
  d = shared_data_dir() / "camvid"
  if not (d / "train").is_dir():
    pytest.skip(f"CamVid not found at {d} (set JAXSEG_SHARED_DATA to the folder holding camvid/)")
  return d


@pytest.fixture
def isbi_dir():
  d = shared_data_dir() / "isbi2012"
  if not d.is_dir():
    pytest.skip(f"ISBI 2012 not found at {d} (set JAXSEG_SHARED_DATA to the folder holding isbi2012/)")
  return d

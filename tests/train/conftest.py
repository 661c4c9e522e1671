"""Fixtures shared by the training tests."""
import pytest


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A TFDS data dir of this test module's own (datasets are generated into it on first use)."""
  return str(tmp_path_factory.mktemp("tfds"))

"""Fixtures of the data tests: a tiny prepared copy of the shapes dataset."""
import pytest

from jaxseg import data


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def tiny_shapes(shapes_data_dir):
  """(train, validation) Sources of a 24 / 10 example shapes variant, prepared once per session."""
  kwargs = dict(data_dir=shapes_data_dir, num_train=24, num_validation=10, seed=7)
  return data.load("shapes", "train", **kwargs), data.load("shapes", "validation", **kwargs)

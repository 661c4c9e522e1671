"""The build/names registry."""
import flax.linen as nn
import pytest

import jaxseg
from jaxseg.models import registry

VGG_ERA = ["deeplabv1", "deeplabv2", "dilation", "fcn16s", "fcn32s", "fcn8s", "segnet", "unet"]


def test_names_lists_the_registered_models():
  names = jaxseg.models.names()
  assert names == sorted(names)
  assert set(VGG_ERA) <= set(names)


@pytest.mark.parametrize("name", VGG_ERA)
def test_build_returns_flax_modules(name):
  model = jaxseg.models.build(name, num_classes=7)
  assert isinstance(model, nn.Module)
  assert model.num_classes == 7


def test_unknown_name_lists_valid_ones():
  with pytest.raises(ValueError, match=r"unknown model 'fcn4s' \(did you mean 'fcn8s'\?\); valid: .*fcn8s.*unet"):
    jaxseg.models.build("fcn4s", num_classes=2)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_num_classes_is_validated(bad):
  with pytest.raises(ValueError, match="num_classes must be a positive int"):
    jaxseg.models.build("unet", num_classes=bad)


def test_unknown_keyword_is_a_type_error():
  with pytest.raises(TypeError, match="colour"):
    jaxseg.models.build("segnet", num_classes=2, colour="red")


def test_register_rejects_duplicates_and_bad_names():
  @registry.register("test_only_model")
  def builder(*, num_classes):
    return nn.Dense(num_classes)

  try:
    assert isinstance(jaxseg.models.build("test_only_model", num_classes=3), nn.Dense)
    registry.register("test_only_model")(builder)  # same function again: fine
    with pytest.raises(ValueError, match="already registered"):
      registry.register("test_only_model")(lambda *, num_classes: None)
  finally:
    registry._BUILDERS.pop("test_only_model")
  with pytest.raises(ValueError, match="non-empty string"):
    registry.register("")

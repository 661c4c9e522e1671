"""config.pretrained: ImageNet backbone files loaded into segmentation models."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxseg
from jaxseg.convert import pretrained
from jaxseg.train import loop
from jaxseg.train.state import create_train_state

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")


def _save(model, path):
  torch.save(model.state_dict(), path)
  return str(path)


def test_backbone_loaded_heads_kept(tmp_path):
  torch.manual_seed(0)
  tv = torchvision.models.mobilenet_v2(weights=None)
  path = _save(tv, tmp_path / "mbv2.pth")
  model = jaxseg.models.build("deeplabv3plus", num_classes=4, backbone="mobilenet_v2")
  state = create_train_state(jax.random.key(0), model, optax.sgd(0.1),
                             jnp.zeros((1, 33, 47, 3)))
  new = loop.load_pretrained(state, model, path)
  sd = tv.state_dict()
  got = new.params["backbone"]["features"]["2"]["conv"]["1"]["0"]["kernel"]  # depthwise
  np.testing.assert_array_equal(got, sd["features.2.conv.1.0.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(new.batch_stats["backbone"]["features"]["0"]["1"]["var"],
                                sd["features.0.1.running_var"].numpy())
  # The heads keep their initialisation; the optimizer state is rebuilt for the new params.
  jax.tree.map(np.testing.assert_array_equal, new.params["classifier"], state.params["classifier"])
  # The loaded network computes what torchvision computes (c4: before the OS16 dilation).
  x = np.random.RandomState(0).rand(1, 64, 64, 3).astype(np.float32)
  feats = model.backbone.apply({"params": new.params["backbone"],
                                "batch_stats": new.batch_stats["backbone"]}, x, train=False)
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  with torch.no_grad():
    ref = tv.eval().features[:14](torch.tensor(((x - mean) / std).transpose(0, 3, 1, 2),
                                                dtype=torch.float32)).numpy()
  np.testing.assert_allclose(feats["c4"], ref.transpose(0, 2, 3, 1), atol=1e-4 * np.abs(ref).max())


def test_wrong_file_is_refused_with_the_mismatch(tmp_path):
  path = _save(torchvision.models.resnet18(weights=None), tmp_path / "r18.pth")
  model = jaxseg.models.build("deeplabv3plus", num_classes=4, backbone="mobilenet_v2")
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  with pytest.raises(ValueError, match=r"(?s)missing.*unexpected"):
    pretrained.load_backbone(model, variables, path)


def test_unknown_name_or_missing_file(tmp_path):
  model = jaxseg.models.build("deeplabv3plus", num_classes=4, backbone="mobilenet_v2")
  with pytest.raises(FileNotFoundError, match="fetch mobilenet_v2"):
    pretrained.load_backbone(model, {}, str(tmp_path / "nope.pth"))
  with pytest.raises(ValueError, match="no `backbone`"):
    pretrained.load_backbone(jaxseg.models.build("unet", num_classes=2), {}, "x.pth")

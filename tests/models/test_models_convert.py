"""PyTorch state dict conversion: layouts, torchvision VGG16 names, error reports."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseg
from jaxseg.convert import from_torch_state_dict, vgg16_state_dict
from jaxseg.models import layers
from jaxseg.models.backbones import vgg
from tests.models import models_testutil as tu

torch = pytest.importorskip("torch")
tnn = torch.nn


class _Small(nn.Module):
  """Conv, BN, transposed convs (flax and bilinear, grouped) and a dense layer."""

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = nn.Conv(4, (3, 3), padding=[(1, 1), (1, 1)], name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    x = nn.ConvTranspose(6, (3, 3), (2, 2), padding=[(1, 1), (1, 1)], transpose_kernel=True,
                         name="tconv")(x)
    x = layers.BilinearConvTranspose(6, 4, 2, padding=1, grouped=True, trainable=True,
                                     name="up")(x)
    x = nn.Conv(6, (3, 3), padding=[(1, 1), (1, 1)], feature_group_count=3, name="gconv")(x)
    return nn.Dense(5, name="fc")(x)


class _TorchSmall(tnn.Module):
  def __init__(self):
    super().__init__()
    self.conv = tnn.Conv2d(3, 4, 3, padding=1)
    self.bn = tnn.BatchNorm2d(4)
    # flax padding k-1-p = 1 on the dilated input <=> torch padding 1
    self.tconv = tnn.ConvTranspose2d(4, 6, 3, 2, padding=1)
    self.up = tnn.ConvTranspose2d(6, 6, 4, 2, padding=1, groups=6, bias=False)
    self.gconv = tnn.Conv2d(6, 6, 3, padding=1, groups=3)
    self.fc = tnn.Linear(6, 5)

  def forward(self, x):
    x = self.gconv(self.up(self.tconv(self.bn(self.conv(x)))))
    return self.fc(x.permute(0, 2, 3, 1))


def _random_torch_small():
  torch.manual_seed(0)
  m = _TorchSmall()
  m.bn.running_mean.uniform_(-1, 1)
  m.bn.running_var.uniform_(0.5, 2)
  m.bn.weight.data.uniform_(0.5, 2)
  return m.eval()


def test_layouts_match_torch():
  tmodel = _random_torch_small()
  sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  variables = from_torch_state_dict(_Small(), sd, sample_input_shape=(1, 5, 7, 3))
  assert set(variables) == {"params", "batch_stats"}
  x = np.random.RandomState(0).randn(2, 5, 7, 3).astype(np.float32)
  out = _Small().apply(variables, jnp.asarray(x), train=False)
  with torch.no_grad():
    ref = tmodel(torch.tensor(tu.nchw(x))).numpy()
  assert out.shape == ref.shape
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=1e-4)


def test_errors_list_missing_unexpected_and_misshaped():
  sd = {k: v.numpy() for k, v in _random_torch_small().state_dict().items()}
  del sd["bn.running_var"]
  sd["extra.weight"] = np.zeros(3)
  sd["fc.weight"] = np.zeros((5, 7), np.float32)
  with pytest.raises(
      ValueError, match="from_torch_state_dict: state dict does not match _Small\n") as err:
    from_torch_state_dict(_Small(), sd, sample_input_shape=(1, 5, 7, 3))
  msg = str(err.value)
  assert "missing (1): bn.running_var" in msg
  assert "unexpected (1): extra.weight" in msg
  assert "mis-shaped (1): fc.weight: torch (5, 7) -> (7, 5), expected (6, 5)" in msg


def test_rename_function_and_dict():
  sd = {"model." + k: v.numpy() for k, v in _random_torch_small().state_dict().items()}
  sd["model.aux.weight"] = np.zeros(1)
  strip = lambda k: None if k.startswith("model.aux") else k[len("model."):]
  a = from_torch_state_dict(_Small(), sd, sample_input_shape=(1, 5, 7, 3), rename=strip)
  b = from_torch_state_dict(_Small(), {strip(k): v for k, v in sd.items() if strip(k)},
                            sample_input_shape=(1, 5, 7, 3))
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_torchvision_vgg16_features_names(batch_norm):
  from torchvision.models import vgg as tv_vgg
  widths = (4, 6, 8, 8, 10)
  cfg = [widths[0]] * 2 + ["M"] + [widths[1]] * 2 + ["M"] + [widths[2]] * 3 + ["M"] + \
        [widths[3]] * 3 + ["M"] + [widths[4]] * 3 + ["M"]
  torch.manual_seed(0)
  features = tv_vgg.make_layers(cfg, batch_norm=batch_norm).eval()
  for mod in features.modules():
    if isinstance(mod, tnn.BatchNorm2d):
      mod.running_mean.uniform_(-0.3, 0.3)
      mod.running_var.uniform_(0.5, 2)
  sd = {"features." + k: v.numpy() for k, v in features.state_dict().items()}
  model = vgg.VGG16(widths=widths, norm="batch" if batch_norm else None)
  variables = from_torch_state_dict(model, vgg16_state_dict(sd, prefix="", batch_norm=batch_norm),
                                    sample_input_shape=(1, 32, 32, 3))
  x = np.random.RandomState(0).randn(1, 32, 32, 3).astype(np.float32)  # even: ceil == floor
  out = model.apply(variables, jnp.asarray(x), train=False)["pool5"]
  with torch.no_grad():
    ref = tu.nhwc(features(torch.tensor(tu.nchw(x))))
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=1e-4)


def test_vgg_classifier_is_convolutionalised_like_fcn():
  # torchvision's classifier.0 sees an NCHW flatten of the 7x7 pool5 map.
  torch.manual_seed(0)
  fc6, fc7 = tnn.Linear(3 * 7 * 7, 5), tnn.Linear(5, 5)
  sd = {f"classifier.{i}.{leaf}": getattr(layer, leaf).detach().numpy()
        for i, layer in ((0, fc6), (3, fc7)) for leaf in ("weight", "bias")}
  sd = vgg16_state_dict(sd, fc=("fc6", "fc7"))
  assert sd["fc6.weight"].shape == (5, 3, 7, 7) and sd["fc7.weight"].shape == (5, 5, 1, 1)

  class Head(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
      x = nn.relu(nn.Conv(5, (7, 7), padding="VALID", name="fc6")(x))
      return nn.Conv(5, (1, 1), name="fc7")(x)

  v = from_torch_state_dict(Head(), sd, sample_input_shape=(1, 7, 7, 3))
  x = np.random.RandomState(1).randn(2, 7, 7, 3).astype(np.float32)
  out = Head().apply(v, jnp.asarray(x), train=False)[:, 0, 0]
  with torch.no_grad():
    ref = fc7(torch.relu(fc6(torch.tensor(tu.nchw(x)).flatten(1)))).numpy()
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_full_torchvision_vgg16_loads_into_fcn8s():
  from torchvision.models import vgg16
  sd = {k: v.numpy() for k, v in vgg16(weights=None).state_dict().items()}
  sd = vgg16_state_dict(sd, fc=("fc6", "fc7"))
  model = jaxseg.models.build("fcn8s", num_classes=21)
  with pytest.raises(
      ValueError, match="from_torch_state_dict: state dict does not match FCN\n") as err:
    from_torch_state_dict(model, sd)
  assert "missing (6): score_fr.bias, score_fr.weight, score_pool3.bias" in str(err.value)
  assert "unexpected" not in str(err.value) and "mis-shaped" not in str(err.value)
  for name, c_in in (("score_fr", 4096), ("score_pool4", 512), ("score_pool3", 256)):
    sd[f"{name}.weight"] = np.zeros((21, c_in, 1, 1), np.float32)
    sd[f"{name}.bias"] = np.zeros(21, np.float32)
  variables = from_torch_state_dict(model, sd)
  assert tu.param_count(variables["params"]) == 134_362_751

"""DeepLab v1 (LargeFOV) and v2 (ASPP-L) on VGG16: geometry, params, torch parity."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseg
from jaxseg.convert import from_torch_state_dict
from jaxseg.models import deeplab
from tests.models import models_testutil as tu

VGG_CONVS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
             (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
VGG_PARAMS = sum(9 * a * b + b for a, b in VGG_CONVS)
BRANCH_PARAMS = 9 * 512 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 21 + 21


def test_v1_param_count_matches_paper():
  params = tu.abstract_variables(jaxseg.models.build("deeplabv1", num_classes=21),
                                 (1, 321, 321, 3))["params"]
  assert tu.param_count(params) == VGG_PARAMS + BRANCH_PARAMS
  assert abs(tu.param_count(params) - 20.5e6) < 0.05e6  # "DeepLab-LargeFOV: 20.5M"


def test_v2_param_count_four_branches():
  params = tu.abstract_variables(jaxseg.models.build("deeplabv2", num_classes=21),
                                 (1, 321, 321, 3))["params"]
  assert tu.param_count(params) == VGG_PARAMS + 4 * BRANCH_PARAMS
  assert sorted(params["aspp"]) == ["branch1", "branch2", "branch3", "branch4"]


@pytest.mark.parametrize("name", ["deeplabv1", "deeplabv2"])
def test_output_stride_8_and_input_size(name):
  model = jaxseg.models.build(name, num_classes=21)
  x = jax.ShapeDtypeStruct((1, 321, 321, 3), jnp.float32)

  def run(x):
    v = model.init(tu.key(), x, train=False)
    return model.apply(v, x, train=False, capture_intermediates=True)

  logits, state = jax.eval_shape(run, x)
  assert logits.shape == (1, 321, 321, 21)
  assert state["intermediates"]["aspp"]["__call__"][0].shape == (1, 41, 41, 21)  # 321 -> 41


@pytest.mark.parametrize("h,w", [(1, 1), (16, 16), (17, 30), (33, 41)])
def test_any_input_size(h, w):
  model = jaxseg.models.build("deeplabv2", num_classes=3, width_multiplier=1 / 32)
  assert tu.abstract_output(model, (2, h, w, 3)).shape == (2, h, w, 3)


def test_align_corners_upsampling_hits_the_scores_exactly_for_8n_plus_1():
  model = jaxseg.models.build("deeplabv1", num_classes=3, width_multiplier=1 / 32)
  x = jnp.asarray(np.random.RandomState(0).uniform(size=(1, 33, 41, 3)), jnp.float32)
  v = tu.init(model, x)
  logits, state = jax.jit(lambda v, x: model.apply(v, x, train=False,
                                                   capture_intermediates=True))(v, x)
  scores = state["intermediates"]["aspp"]["__call__"][0]
  assert scores.shape == (1, 5, 6, 3)
  np.testing.assert_allclose(logits[:, ::8, ::8], scores, rtol=1e-5, atol=1e-6)


def test_bad_arguments():
  with pytest.raises(ValueError, match="backbone must be 'vgg16'"):
    jaxseg.models.build("deeplabv1", num_classes=3, backbone="resnet101")
  with pytest.raises(ValueError, match="at least one dilation rate"):
    tu.abstract_output(jaxseg.models.build("deeplabv2", num_classes=3, rates=(),
                                           width_multiplier=1 / 32), (1, 16, 16, 3))


def _torch_deeplab(widths, fc, num_classes, rates, pool5a):
  torch = pytest.importorskip("torch")
  tnn = torch.nn
  depths = (2, 2, 3, 3, 3)

  class Branch(tnn.Module):
    def __init__(self, rate):
      super().__init__()
      self.fc6 = tnn.Conv2d(widths[4], fc, 3, padding=rate, dilation=rate)
      self.fc7 = tnn.Conv2d(fc, fc, 1)
      self.fc8 = tnn.Conv2d(fc, num_classes, 1)

    def forward(self, x):
      return self.fc8(torch.relu(self.fc7(torch.relu(self.fc6(x)))))

  class TorchDeepLab(tnn.Module):
    def __init__(self):
      super().__init__()
      convs, c = {}, 3
      for s, (w, d) in enumerate(zip(widths, depths), 1):
        for j in range(1, d + 1):
          dil = 2 if s == 5 else 1
          convs[f"conv{s}_{j}"] = tnn.Conv2d(c, w, 3, padding=dil, dilation=dil)
          c = w
      self.backbone = tnn.ModuleDict(convs)
      self.aspp = tnn.ModuleDict({f"branch{i + 1}": Branch(r) for i, r in enumerate(rates)})

    def forward(self, x):
      h, w = x.shape[2:]
      for s, d in enumerate(depths, 1):
        for j in range(1, d + 1):
          x = torch.relu(self.backbone[f"conv{s}_{j}"](x))
        x = tnn.functional.max_pool2d(x, 3, 2 if s <= 3 else 1, 1, ceil_mode=True)
      if pool5a:
        x = tnn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=True)
      x = sum(b(x) for b in self.aspp.values())
      return tnn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=True)

  torch.manual_seed(0)
  return TorchDeepLab().eval()


@pytest.mark.parametrize("rates,pool5a,size", [((12,), True, (30, 45)),
                                               ((6, 12, 18, 24), False, (41, 26))])
def test_matches_torch_reference(rates, pool5a, size):
  torch = pytest.importorskip("torch")
  widths, fc = (3, 4, 5, 6, 6), 8
  tmodel = _torch_deeplab(widths, fc, 4, rates, pool5a)
  model = deeplab.DeepLabVGG(num_classes=4, rates=rates, pool5a=pool5a, widths=widths,
                             fc_features=fc, mean=(0., 0., 0.), std=(1., 1., 1.))
  sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  variables = from_torch_state_dict(model, sd, sample_input_shape=(1,) + size + (3,))
  x = np.random.RandomState(0).uniform(size=(2,) + size + (3,)).astype(np.float32)
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(x))
  with torch.no_grad():
    ref = tu.nhwc(tmodel(torch.tensor(tu.nchw(x))))
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=1e-4)

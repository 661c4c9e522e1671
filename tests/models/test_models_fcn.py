"""FCN-32s/16s/8s: Caffe geometry for any input size, params, torch parity."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseg
from jaxseg.convert import from_torch_state_dict
from jaxseg.models import fcn as fcn_lib
from jaxseg.models import layers
from tests.models import models_testutil as tu

SIZES = [(1, 1), (2, 3), (16, 16), (17, 31), (32, 33), (63, 64), (97, 40)]


@pytest.mark.parametrize("name", ["fcn32s", "fcn16s", "fcn8s"])
def test_output_has_input_size_for_any_size(name):
  model = jaxseg.models.build(name, num_classes=5, width_multiplier=1 / 32)
  for h, w in SIZES:
    assert tu.abstract_output(model, (1, h, w, 3)).shape == (1, h, w, 5), (h, w)


def test_full_size_geometry_and_param_count():
  model = jaxseg.models.build("fcn8s", num_classes=21)
  assert tu.abstract_output(model, (1, 500, 375, 3)).shape == (1, 500, 375, 21)
  params = tu.abstract_variables(model, (1, 64, 64, 3))["params"]
  vgg_convs = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
               (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
  expected = sum(9 * a * b + b for a, b in vgg_convs)
  expected += 49 * 512 * 4096 + 4096 + 4096 * 4096 + 4096  # fc6, fc7
  expected += (4096 + 1) * 21 + (512 + 1) * 21 + (256 + 1) * 21  # score_fr, pool4, pool3
  assert tu.param_count(params) == expected
  assert abs(expected - 134e6) < 0.5e6
  # Learnable upsampling adds the three deconvolutions (no bias).
  trainable = jaxseg.models.build("fcn8s", num_classes=21, trainable_upsampling=True)
  extra = tu.param_count(tu.abstract_variables(trainable, (1, 64, 64, 3))["params"]) - expected
  assert extra == (16 + 16 + 256) * 21 * 21


def test_score_layers_start_at_zero_and_upsampling_is_bilinear():
  model = jaxseg.models.build("fcn8s", num_classes=3, width_multiplier=1 / 32,
                              trainable_upsampling=True)
  v = tu.init(model, jnp.zeros((1, 20, 20, 3)))["params"]
  for name in ("score_fr", "score_pool4", "score_pool3"):
    assert not np.any(v[name]["kernel"]) and not np.any(v[name]["bias"])
  np.testing.assert_array_equal(v["upscore8"]["kernel"], layers.bilinear_kernel(16, 3))
  frozen = jaxseg.models.build("fcn8s", num_classes=3, width_multiplier=1 / 32)
  assert "upscore8" not in tu.init(frozen, jnp.zeros((1, 20, 20, 3)))["params"]


def test_at_once_scales_pool4_and_pool3():
  base = jaxseg.models.build("fcn8s", num_classes=3, width_multiplier=1 / 32)
  at_once = jaxseg.models.build("fcn8s", num_classes=3, width_multiplier=1 / 32, at_once=True)
  x = jnp.asarray(np.random.RandomState(0).uniform(size=(1, 21, 19, 3)), jnp.float32)
  v = tu.init(base, x)
  rng = np.random.RandomState(1)
  p = jax.tree.map(lambda a: a + 0.1 * rng.randn(*a.shape).astype(np.float32), v["params"])
  scaled = dict(p)
  scaled["score_pool4"] = {"kernel": p["score_pool4"]["kernel"] / 0.01,
                           "bias": p["score_pool4"]["bias"]}
  scaled["score_pool3"] = {"kernel": p["score_pool3"]["kernel"] / 1e-4,
                           "bias": p["score_pool3"]["bias"]}
  a = base.apply({"params": p}, x, train=False)
  b = at_once.apply({"params": scaled}, x, train=False)
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  assert not np.allclose(a, at_once.apply({"params": p}, x, train=False), atol=1e-3)


def test_bad_arguments():
  with pytest.raises(ValueError, match="backbone must be 'vgg16'"):
    jaxseg.models.build("fcn8s", num_classes=3, backbone="resnet50")
  with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32"):
    tu.abstract_output(fcn_lib.FCN(num_classes=3, output_stride=4, widths=(1,) * 5,
                                   fc_features=2), (1, 8, 8, 3))


# ---------------------------------------------------------------------------
# torch reference with Caffe's FCN-8s prototxt geometry
# ---------------------------------------------------------------------------

def _torch_fcn8s(widths, fc, num_classes, random_upsampling):
  torch = pytest.importorskip("torch")
  tnn = torch.nn
  depths = (2, 2, 3, 3, 3)

  class TorchFCN8s(tnn.Module):
    def __init__(self):
      super().__init__()
      convs, c = {}, 3
      for s, (w, d) in enumerate(zip(widths, depths), 1):
        for j in range(1, d + 1):
          convs[f"conv{s}_{j}"] = tnn.Conv2d(c, w, 3, padding=100 if (s, j) == (1, 1) else 1)
          c = w
      self.backbone = tnn.ModuleDict(convs)
      self.fc6 = tnn.Conv2d(widths[4], fc, 7)
      self.fc7 = tnn.Conv2d(fc, fc, 1)
      self.score_fr = tnn.Conv2d(fc, num_classes, 1)
      self.score_pool4 = tnn.Conv2d(widths[3], num_classes, 1)
      self.score_pool3 = tnn.Conv2d(widths[2], num_classes, 1)
      self.upscore2 = tnn.ConvTranspose2d(num_classes, num_classes, 4, 2, bias=False)
      self.upscore_pool4 = tnn.ConvTranspose2d(num_classes, num_classes, 4, 2, bias=False)
      self.upscore8 = tnn.ConvTranspose2d(num_classes, num_classes, 16, 8, bias=False)
      for up in (self.upscore2, self.upscore_pool4, self.upscore8):
        k = up.kernel_size[0]
        f = (k + 1) // 2
        c0 = f - 0.5
        og = torch.arange(k, dtype=torch.float32)
        filt = (1 - (og - c0).abs() / f)[:, None] * (1 - (og - c0).abs() / f)[None, :]
        if random_upsampling:
          up.weight.data.normal_(0, 0.1)
        else:
          up.weight.data.zero_()
          for i in range(num_classes):
            up.weight.data[i, i] = filt

    def forward(self, x):
      h, w = x.shape[2:]
      pool = tnn.MaxPool2d(2, 2, ceil_mode=True)
      feats = {}
      for s, d in enumerate(depths, 1):
        for j in range(1, d + 1):
          x = torch.relu(self.backbone[f"conv{s}_{j}"](x))
        x = pool(x)
        feats[s] = x
      x = torch.relu(self.fc7(torch.relu(self.fc6(x))))
      x = self.upscore2(self.score_fr(x))
      sp4 = self.score_pool4(feats[4])[:, :, 5:5 + x.shape[2], 5:5 + x.shape[3]]
      x = self.upscore_pool4(x + sp4)
      sp3 = self.score_pool3(feats[3])[:, :, 9:9 + x.shape[2], 9:9 + x.shape[3]]
      x = self.upscore8(x + sp3)
      return x[:, :, 31:31 + h, 31:31 + w]

  torch.manual_seed(0)
  m = TorchFCN8s()
  for layer in (m.score_fr, m.score_pool4, m.score_pool3):  # non-zero, to see every path
    layer.weight.data.normal_(0, 0.3)
  return m.eval()


@pytest.mark.parametrize("random_upsampling,size", [(False, (37, 50)), (True, (32, 19))])
def test_fcn8s_matches_torch_caffe_geometry(random_upsampling, size):
  torch = pytest.importorskip("torch")
  widths, fc = (3, 4, 5, 6, 6), 8
  tmodel = _torch_fcn8s(widths, fc, 4, random_upsampling)
  model = fcn_lib.FCN(num_classes=4, widths=widths, fc_features=fc,
                      trainable_upsampling=random_upsampling, mean=(0., 0., 0.), std=(1., 1., 1.))
  sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  variables = from_torch_state_dict(model, sd, sample_input_shape=(1,) + size + (3,))
  x = np.random.RandomState(0).uniform(size=(1,) + size + (3,)).astype(np.float32)
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(x))
  with torch.no_grad():
    ref = tu.nhwc(tmodel(torch.tensor(tu.nchw(x))))
  assert out.shape == ref.shape == (1,) + size + (4,)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=1e-4)
  if not random_upsampling:
    # A frozen model refuses non-bilinear deconvolution weights.
    bad = dict(sd, **{"upscore8.weight": sd["upscore8.weight"] + 1})
    with pytest.raises(ValueError, match="upscore8.weight: layer is frozen bilinear"):
      from_torch_state_dict(model, bad, sample_input_shape=(1,) + size + (3,))

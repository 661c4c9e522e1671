"""SegNet: Caffe geometry (ceil-mode argmax pools), parameter count, torch parity."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseg
from jaxseg.convert import from_torch_state_dict
from jaxseg.models import segnet as segnet_lib
from jaxseg.models.backbones import vgg
from tests.models import models_testutil as tu


def test_full_size_camvid_geometry_and_params():
  model = jaxseg.models.build("segnet", num_classes=11)
  out = tu.abstract_output(model, (1, 360, 480, 3))
  assert out.shape == (1, 360, 480, 11)
  params = tu.abstract_variables(model, (1, 360, 480, 3))["params"]
  # 13 encoder convs + 12 decoder convs with BN (2 params/channel) + final conv, all with bias.
  enc = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
         (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
  dec = [(512, 512)] * 3 + [(512, 512), (512, 512), (512, 256), (256, 256), (256, 256),
                            (256, 128), (128, 128), (128, 64), (64, 64)]
  expected = sum(9 * a * b + b + 2 * b for a, b in enc + dec) + 9 * 64 * 11 + 11
  assert tu.param_count(params) == expected
  assert abs(expected - 29.5e6) < 0.1e6  # the paper's 29.5M


def test_pool_sizes_follow_ceil_mode():
  # CamVid 360x480: 180x240, 90x120, 45x60, 23x30, 12x15 (SegNet-Tutorial's upsample_h/w).
  feats = jax.eval_shape(
      lambda x: vgg.VGG16(widths=(1,) * 5, norm="batch", pool_type="argmax").init_with_output(
          tu.key(), x, train=False)[0], jax.ShapeDtypeStruct((1, 360, 480, 3), jnp.float32))
  assert [feats[f"pool{s}"].shape[1:3] for s in range(1, 6)] == [
      (180, 240), (90, 120), (45, 60), (23, 30), (12, 15)]


@pytest.mark.parametrize("h,w", [(16, 16), (23, 45), (1, 1), (33, 7)])
def test_any_input_size(h, w):
  model = jaxseg.models.build("segnet", num_classes=4, width_multiplier=1 / 16)
  assert tu.abstract_output(model, (2, h, w, 3)).shape == (2, h, w, 4)


def test_bad_backbone():
  with pytest.raises(ValueError, match="backbone must be 'vgg16'"):
    jaxseg.models.build("segnet", num_classes=4, backbone="resnet50")


def _torch_segnet(widths, num_classes):
  torch = pytest.importorskip("torch")
  tnn = torch.nn
  w1, w2, w3, w4, w5 = widths
  enc = [[3, w1, w1], [w1, w2, w2], [w2, w3, w3, w3], [w3, w4, w4, w4], [w4, w5, w5, w5]]
  dec = {5: [w5, w5, w5, w4], 4: [w4, w4, w4, w3], 3: [w3, w3, w3, w2], 2: [w2, w2, w1],
         1: [w1, w1]}

  class TorchSegNet(tnn.Module):
    def __init__(self):
      super().__init__()
      enc_names, dec_names = [], []
      layers = {}
      for s, chans in enumerate(enc, 1):
        for j in range(1, len(chans)):
          name = f"conv{s}_{j}"
          layers[name] = tnn.Conv2d(chans[j - 1], chans[j], 3, padding=1)
          layers[f"{name}_bn"] = tnn.BatchNorm2d(chans[j])
          enc_names.append((s, name))
      for s in range(5, 0, -1):
        chans = dec[s]
        n = len(chans) - 1
        for j in range(n):
          name = f"conv{s}_{vgg.VGG16_DEPTHS[s - 1] - j}_D"
          layers[name] = tnn.Conv2d(chans[j], chans[j + 1], 3, padding=1)
          layers[f"{name}_bn"] = tnn.BatchNorm2d(chans[j + 1])
          dec_names.append((s, name))
      layers["conv1_1_D"] = tnn.Conv2d(w1, num_classes, 3, padding=1)
      self.backbone = tnn.ModuleDict({k: v for k, v in layers.items() if "_D" not in k})
      self.dec = tnn.ModuleDict({k: v for k, v in layers.items() if "_D" in k})
      self.enc_names, self.dec_names = enc_names, dec_names

    def forward(self, x):
      pool = tnn.MaxPool2d(2, 2, ceil_mode=True, return_indices=True)
      unpool = tnn.MaxUnpool2d(2, 2)
      stack = []
      for s in range(1, 6):
        for stage, name in self.enc_names:
          if stage == s:
            x = torch.relu(self.backbone[f"{name}_bn"](self.backbone[name](x)))
        size = x.shape[2:]
        x, idx = pool(x)
        stack.append((idx, size))
      for s in range(5, 0, -1):
        idx, size = stack[s - 1]
        x = unpool(x, idx, output_size=size)
        for stage, name in self.dec_names:
          if stage == s:
            x = torch.relu(self.dec[f"{name}_bn"](self.dec[name](x)))
      return self.dec["conv1_1_D"](x)

  torch.manual_seed(0)
  m = TorchSegNet()
  for mod in m.modules():
    if isinstance(mod, tnn.BatchNorm2d):
      mod.running_mean.uniform_(-0.2, 0.2)
      mod.running_var.uniform_(0.5, 2.0)
      mod.bias.data.uniform_(-0.1, 0.1)
  return m.eval()


def _rename(key):
  # The torch reference keeps the decoder in its own dict; flax has flat names.
  return key[len("dec."):] if key.startswith("dec.") else key


def test_matches_torch_reference_at_odd_size():
  torch = pytest.importorskip("torch")
  widths = (4, 6, 8, 8, 10)
  tmodel = _torch_segnet(widths, 5)
  model = segnet_lib.SegNet(num_classes=5, widths=widths, mean=(0., 0., 0.), std=(1., 1., 1.))
  sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  variables = from_torch_state_dict(model, sd, sample_input_shape=(1, 45, 30, 3), rename=_rename)
  x = np.random.RandomState(0).uniform(size=(2, 45, 30, 3)).astype(np.float32)
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(x))
  with torch.no_grad():
    ref = tu.nhwc(tmodel(torch.tensor(tu.nchw(x))))
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=1e-4)

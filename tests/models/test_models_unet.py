"""UNet: geometry of both variants, size validation, parity with a torch UNet."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseg
from jaxseg.convert import from_torch_state_dict
from jaxseg.models import unet as unet_lib
from tests.models import models_testutil as tu


@pytest.mark.parametrize("h,w", [(16, 16), (17, 23), (1, 1), (31, 8)])
@pytest.mark.parametrize("upsampling", ["transpose", "bilinear"])
def test_same_padding_keeps_any_input_size(h, w, upsampling):
  model = jaxseg.models.build("unet", num_classes=3, features=4, depth=3, upsampling=upsampling)
  assert tu.abstract_output(model, (2, h, w, 3)).shape == (2, h, w, 3)


def test_paper_unet_geometry_and_params():
  model = jaxseg.models.build("unet", num_classes=2, padding="valid")
  assert model.norm is None and model.dropout == 0.5
  out = tu.abstract_output(model, (1, 572, 572, 3))
  assert out.shape == (1, 388, 388, 2) and out.dtype == jnp.float32
  # Independent count: two 3x3 convs per level, up-convs 2x2, 1x1 head, all with bias.
  widths = [64, 128, 256, 512, 1024]
  expected, c_in = 0, 3
  for w in widths:
    expected += 9 * c_in * w + w + 9 * w * w + w
    c_in = w
  for w in reversed(widths[:-1]):
    expected += 4 * 2 * w * w + w  # up-conv 2w -> w
    expected += 9 * 2 * w * w + w + 9 * w * w + w
  expected += 64 * 2 + 2
  params = tu.abstract_variables(model, (1, 572, 572, 3))["params"]
  assert tu.param_count(params) == expected == 31_031_810


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_valid_size_rule_matches_brute_force(depth):
  sizes = unet_lib.valid_unet_sizes(depth, limit=400)
  step = 2**depth
  assert all(s % step == (-4) % step for s in sizes)
  assert sizes == list(range(sizes[0], 401, step))
  model = unet_lib.UNet(num_classes=2, depth=depth, features=2, padding="valid", norm=None)
  for s in sizes[:2]:
    out = tu.abstract_output(model, (1, s, s + step, 3))
    assert out.shape[1:3] == (unet_lib.valid_unet_output_size(s, depth),
                              unet_lib.valid_unet_output_size(s + step, depth))
    assert out.shape[1] >= 1
  if depth == 4:
    assert sizes[0] == 188


def test_valid_rejects_bad_sizes_naming_nearest():
  model = jaxseg.models.build("unet", num_classes=2, padding="valid", features=2)
  with pytest.raises(ValueError,
                     match=r"height 570 .*height % 16 == 12.*nearest valid: \[556, 572\]"):
    tu.abstract_output(model, (1, 570, 572, 3))
  with pytest.raises(ValueError, match=r"width 100 .*nearest valid: \[188\]"):
    tu.abstract_output(model, (1, 188, 100, 3))


def test_bad_configs_and_inputs():
  for kw, msg in [({"padding": "full"}, "padding must be"),
                  ({"upsampling": "nearest"}, "upsampling"),
                  ({"norm": "group"}, "norm must be"), ({"depth": 0}, "depth")]:
    with pytest.raises(ValueError, match=msg):
      tu.abstract_output(jaxseg.models.build("unet", num_classes=2, **kw), (1, 16, 16, 3))
  model = jaxseg.models.build("unet", num_classes=2, features=2, depth=2)
  with pytest.raises(ValueError, match="rank 4"):
    tu.abstract_output(model, (16, 16, 3))
  with pytest.raises(TypeError, match="floating point"):
    model.init(tu.key(), jnp.zeros((1, 16, 16, 3), jnp.uint8), train=False)


def test_research_style_apply_and_train_mode():
  model = jaxseg.models.build("unet", num_classes=3, features=4, depth=2, dropout=0.5)
  images = jnp.asarray(np.random.RandomState(0).uniform(size=(2, 15, 18, 3)), jnp.float32)
  variables = model.init(tu.key(), images, train=False)
  assert set(variables) == {"params", "batch_stats"}
  eval_logits = model.apply(variables, images, train=False)
  assert eval_logits.shape == (2, 15, 18, 3) and eval_logits.dtype == jnp.float32
  train_logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"],
                                      rngs={"dropout": tu.key(1)})
  assert not np.allclose(train_logits, eval_logits)
  assert not np.allclose(updates["batch_stats"]["down0"]["bn0"]["mean"], 0)
  with pytest.raises(Exception, match="dropout"):
    model.apply(variables, images, train=True, mutable=["batch_stats"])


# ---------------------------------------------------------------------------
# torch reference (same module names, so the converter maps it directly)
# ---------------------------------------------------------------------------

def _torch_unet(depth, features, num_classes, padding, upsampling, norm):
  torch = pytest.importorskip("torch")
  tnn = torch.nn
  pad = 1 if padding == "same" else 0

  def block(c_in, c_out):
    d = {}
    for i, (a, b) in enumerate([(c_in, c_out), (c_out, c_out)]):
      d[f"conv{i}"] = tnn.Conv2d(a, b, 3, padding=pad, bias=not norm)
      if norm:
        d[f"bn{i}"] = tnn.BatchNorm2d(b)
    return tnn.ModuleDict(d)

  class TorchUNet(tnn.Module):
    def __init__(self):
      super().__init__()
      c = 3
      for level in range(depth):
        setattr(self, f"down{level}", block(c, features * 2**level))
        c = features * 2**level
      self.bottleneck = block(c, features * 2**depth)
      for level in reversed(range(depth)):
        w = features * 2**level
        if upsampling == "transpose":
          setattr(self, f"upconv{level}", tnn.ConvTranspose2d(2 * w, w, 2, 2))
        else:
          setattr(self, f"upconv{level}", tnn.Conv2d(2 * w, w, 1))
        setattr(self, f"up{level}", block(2 * w, w))
      self.head = tnn.Conv2d(features, num_classes, 1)

    @staticmethod
    def run(b, x):
      for i in range(2):
        x = b[f"conv{i}"](x)
        if norm:
          x = b[f"bn{i}"](x)
        x = torch.relu(x)
      return x

    def forward(self, x):
      h, w = x.shape[2:]
      if padding == "same":  # documented behaviour: pad to a multiple of 2**depth, crop back
        ph, pw = -h % 2**depth, -w % 2**depth
        x = tnn.functional.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
      skips = []
      for level in range(depth):
        x = self.run(getattr(self, f"down{level}"), x)
        skips.append(x)
        x = tnn.functional.max_pool2d(x, 2)
      x = self.run(self.bottleneck, x)
      for level in reversed(range(depth)):
        if upsampling == "bilinear":
          x = tnn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = getattr(self, f"upconv{level}")(x)
        s = skips[level]
        oy, ox = (s.shape[2] - x.shape[2]) // 2, (s.shape[3] - x.shape[3]) // 2
        s = s[:, :, oy:oy + x.shape[2], ox:ox + x.shape[3]]
        x = self.run(getattr(self, f"up{level}"), torch.cat([s, x], 1))
      x = self.head(x)
      if padding == "same":
        x = x[:, :, ph // 2:ph // 2 + h, pw // 2:pw // 2 + w]
      return x

  torch.manual_seed(0)
  m = TorchUNet()
  if norm:  # non-trivial running statistics
    for mod in m.modules():
      if isinstance(mod, tnn.BatchNorm2d):
        mod.running_mean.uniform_(-0.5, 0.5)
        mod.running_var.uniform_(0.5, 2.0)
        mod.weight.data.uniform_(0.5, 1.5)
        mod.bias.data.uniform_(-0.2, 0.2)
  return m.eval()


@pytest.mark.parametrize("padding,upsampling,norm,size", [
    ("same", "transpose", "batch", 16), ("valid", "transpose", None, 44),
    ("same", "bilinear", None, 8)])
def test_matches_torch_reference(padding, upsampling, norm, size):
  torch = pytest.importorskip("torch")
  depth, features = 2, 4
  tmodel = _torch_unet(depth, features, 3, padding, upsampling, norm)
  model = unet_lib.UNet(num_classes=3, depth=depth, features=features, padding=padding,
                        upsampling=upsampling, norm=norm, mean=(0., 0., 0.), std=(1., 1., 1.))
  sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  variables = from_torch_state_dict(model, sd, sample_input_shape=(1, size, size, 3))
  # Non-square; the same-padded cases also need the pad-and-crop path.
  width = size + 4 if padding == "valid" else size + 3
  x = np.random.RandomState(0).uniform(size=(2, size, width, 3)).astype(np.float32)
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(x))
  with torch.no_grad():
    ref = tu.nhwc(tmodel(torch.tensor(tu.nchw(x))))
  assert out.shape == ref.shape
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=1e-4)

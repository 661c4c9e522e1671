"""The segmentation heads against PyTorch modules written from the original descriptions.

The torch modules below follow the papers and released code as summarised in
``architectures.md`` (RefineNet: Lin et al. 2017 / best-of-acrv/refinenet; PSPNet:
hszhao/semseg; DeepLab v3+: tensorflow/models research/deeplab); they are not
transliterations of the flax heads. Each test initialises a flax head, makes every weight
and BatchNorm statistic non-trivial, copies them into the torch module through an
explicit name table (which must use every torch tensor and every flax leaf exactly once),
and compares eval-mode outputs on random feature maps: max |jax - torch| / max |torch|.
"""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.models import heads
from tests.models import models_testutil as tu

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

TOL = 1e-4


# ----------------------------------------------------------------------------
# Shared helpers: random weights, the name table, features
# ----------------------------------------------------------------------------

def _randomise(variables, seed=0):
  """Weights of a realistic scale everywhere (kernels ~ 1/sqrt(fan_in), so no branch is
  negligible) and non-trivial BatchNorm affine parameters and running statistics."""
  rng = np.random.RandomState(seed)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  out = {}
  for path, v in sorted(flat.items()):
    shape, leaf = v.shape, path[-1]
    if leaf == "kernel":
      new = rng.randn(*shape) / np.sqrt(np.prod(shape[:-1]))
    elif path[0] == "batch_stats" and leaf == "mean":
      new = rng.uniform(-0.5, 0.5, shape)
    elif path[0] == "batch_stats" and leaf == "var":
      new = rng.uniform(0.5, 2.0, shape)
    elif leaf == "scale":
      new = rng.uniform(0.5, 1.5, shape)
    elif leaf == "bias":
      new = rng.uniform(-0.5, 0.5, shape)
    else:
      raise AssertionError(f"unexpected variable {path}")
    out[path] = jnp.asarray(new, jnp.float32)
  return flax.traverse_util.unflatten_dict(out)


def _load(tmodule, table, variables):
  """Copies flax variables into ``tmodule`` by ``table``: torch prefix -> (kind, flax path).

  kind "conv": ``weight`` (OIHW) <- ``kernel`` (HWIO), ``bias`` <- ``bias`` if the torch conv
  has one; kind "bn": ``weight, bias`` <- params ``scale, bias``, ``running_mean,
  running_var`` <- batch_stats ``mean, var``. Asserts that every torch tensor is written
  and every flax leaf is read.
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  used = set()
  state = {k: v for k, v in tmodule.state_dict().items() if not k.endswith("num_batches_tracked")}
  written = set()

  def take(path):
    assert path in flat, f"flax has no {'/'.join(path)}"
    assert path not in used, f"{'/'.join(path)} mapped twice"
    used.add(path)
    return torch.from_numpy(np.asarray(flat[path]).copy())

  with torch.no_grad():
    for prefix, (kind, fpath) in table.items():
      fpath = tuple(fpath.split("/"))
      if kind == "conv":
        state[f"{prefix}.weight"].copy_(take(("params",) + fpath + ("kernel",)).permute(3, 2, 0, 1))
        written.add(f"{prefix}.weight")
        if f"{prefix}.bias" in state:
          state[f"{prefix}.bias"].copy_(take(("params",) + fpath + ("bias",)))
          written.add(f"{prefix}.bias")
      elif kind == "bn":
        for tname, fleaf in (("weight", ("params", "scale")), ("bias", ("params", "bias")),
                             ("running_mean", ("batch_stats", "mean")),
                             ("running_var", ("batch_stats", "var"))):
          state[f"{prefix}.{tname}"].copy_(take((fleaf[0],) + fpath + (fleaf[1],)))
          written.add(f"{prefix}.{tname}")
      else:
        raise AssertionError(kind)
  assert written == set(state), f"torch tensors not written: {sorted(set(state) - written)}"
  assert used == set(flat), f"flax leaves not used: {sorted('/'.join(p) for p in set(flat) - used)}"
  return tmodule.eval()


def _feats(shapes, seed=1):
  rng = np.random.RandomState(seed)
  return {k: rng.randn(*s).astype(np.float32) for k, s in shapes.items()}


def _t(x):
  return torch.from_numpy(tu.nchw(x))


def _rel(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _flax_head(head, feats, seed=0):
  """(random variables, eval-mode output); the variables' structure comes from a traced init."""
  feats = {k: jnp.asarray(v) for k, v in feats.items()}
  shapes = jax.eval_shape(lambda f: head.init(tu.key(0), f, train=False), feats)
  variables = _randomise(shapes, seed)
  out = jax.jit(lambda v, f: head.apply(v, f, train=False))(variables, feats)
  return variables, np.asarray(out)


def conv3x3(cin, cout, bias=False, dilation=1):
  return nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=bias)


def conv1x1(cin, cout, bias=False):
  return nn.Conv2d(cin, cout, 1, bias=bias)


def up(x, size):
  return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


# ----------------------------------------------------------------------------
# RefineNet (Lin et al. 2017; best-of-acrv/refinenet port of the released code)
# ----------------------------------------------------------------------------

class RCU(nn.Module):
  """Residual conv unit: ReLU -> 3x3 conv (bias) -> ReLU -> 3x3 conv (no bias), + input."""

  def __init__(self, c):
    super().__init__()
    self.conv_a = conv3x3(c, c, bias=True)
    self.conv_b = conv3x3(c, c)

  def forward(self, x):
    return x + self.conv_b(F.relu(self.conv_a(F.relu(x))))


class CRP(nn.Module):
  """Chained residual pooling: top = conv3x3(maxpool 5x5 s1 p2(top)); x = x + top, n times."""

  def __init__(self, c, stages):
    super().__init__()
    self.convs = nn.ModuleList([conv3x3(c, c) for _ in range(stages)])

  def forward(self, x):
    top = x
    for conv in self.convs:
      top = conv(F.max_pool2d(top, 5, stride=1, padding=2))
      x = x + top
    return x


class TorchRefineNet(nn.Module):
  """The RefineNet-4 cascade on l1..l4 (= c2..c5) as released.

  Path i (4 = coarsest): a 3x3 conv reduces l_i (2048 -> 512 for RefineNet-4, else -> 256),
  two RCUs adapt it; for i < 4 a 3x3 conv maps it to the fusion width and the previous
  block's output, already passed through its own 3x3 conv at its coarse size, is upsampled
  (bilinear, align_corners=True) and added; ReLU; CRP; output RCUs. The classifier is a 3x3
  conv with bias at stride 4. Dropout (identity in eval) is left out.
  """

  def __init__(self, in_channels, features, num_classes, crp_stages=4, output_rcus=3):
    super().__init__()
    self.reduce = nn.ModuleList()
    self.adapt = nn.ModuleList()
    self.adapt_out = nn.ModuleList()   # fusion conv of the block's own path (blocks 3..1)
    self.crp = nn.ModuleList()
    self.out_rcus = nn.ModuleList()
    self.varout = nn.ModuleList()      # conv of the block's output before the next fusion
    for i, cin in enumerate(reversed(in_channels)):   # c5 first
      width = 2 * features if i == 0 else features
      self.reduce.append(conv3x3(cin, width))
      self.adapt.append(nn.Sequential(RCU(width), RCU(width)))
      self.adapt_out.append(conv3x3(width, width) if i > 0 else nn.Identity())
      self.crp.append(CRP(width, crp_stages))
      self.out_rcus.append(nn.Sequential(*[RCU(width) for _ in range(output_rcus)]))
      self.varout.append(conv3x3(width, features) if i < 3 else nn.Identity())
    self.clf = conv3x3(features, num_classes, bias=True)

  def forward(self, c2, c3, c4, c5):
    prev = None
    for i, level in enumerate((c5, c4, c3, c2)):
      x = self.adapt[i](self.reduce[i](level))
      if prev is not None:
        x = self.adapt_out[i](x) + up(prev, x.shape[2:])
      x = self.out_rcus[i](self.crp[i](F.relu(x)))
      prev = self.varout[i](x)
    return self.clf(x)


def _refinenet_table(crp_stages, output_rcus):
  """torch prefix -> flax path. Flax names the two fusion convs of block k ``fusion/conv1``
  (own path) and ``fusion/conv2`` (the previous block's output): the released code's
  ``adapt_stage{k}_b2_joint_varout_dimred`` and ``mflow_conv_g{k-1}_b3_joint_varout_dimred``."""
  table = {"clf": ("conv", "classifier")}
  for i in range(4):
    block = f"refinenet{4 - i}"
    table[f"reduce.{i}"] = ("conv", f"reduce{4 - i}")
    for r in range(2):
      table[f"adapt.{i}.{r}.conv_a"] = ("conv", f"{block}/rcu{r + 1}/conv1")
      table[f"adapt.{i}.{r}.conv_b"] = ("conv", f"{block}/rcu{r + 1}/conv2")
    if i > 0:
      table[f"adapt_out.{i}"] = ("conv", f"{block}/fusion/conv1")
      table[f"varout.{i - 1}"] = ("conv", f"{block}/fusion/conv2")
    for s in range(crp_stages):
      table[f"crp.{i}.convs.{s}"] = ("conv", f"{block}/crp/conv{s + 1}")
    for r in range(output_rcus):
      table[f"out_rcus.{i}.{r}.conv_a"] = ("conv", f"{block}/out_rcu{r + 1}/conv1")
      table[f"out_rcus.{i}.{r}.conv_b"] = ("conv", f"{block}/out_rcu{r + 1}/conv2")
  return table


REFINENET_SIZES = [
    # (c2, c3, c4, c5) spatial sizes of a ResNet at 65x91 and at 33x47 (odd, ceil-halved)
    ((17, 23), (9, 12), (5, 6), (3, 3)),
    ((9, 12), (5, 6), (3, 3), (2, 2)),
]


@pytest.mark.parametrize("sizes,crp_stages,output_rcus", [
    (REFINENET_SIZES[0], 4, 3),   # as released
    (REFINENET_SIZES[1], 2, 1),   # the paper's figure
], ids=["65x91-released", "33x47-paper"])
def test_refinenet_head_matches_torch_reference(sizes, crp_stages, output_rcus):
  channels = (8, 12, 20, 24)
  feats = _feats({f"c{i + 2}": (2,) + s + (c,) for i, (s, c) in enumerate(zip(sizes, channels))})
  head = heads.RefineNetHead(num_classes=5, features=8, crp_stages=crp_stages,
                             output_rcus=output_rcus)
  variables, out = _flax_head(head, feats)
  tmodel = _load(TorchRefineNet(channels, 8, 5, crp_stages, output_rcus),
                 _refinenet_table(crp_stages, output_rcus), variables)
  with torch.no_grad():
    ref = tu.nhwc(tmodel(*[_t(feats[k]) for k in ("c2", "c3", "c4", "c5")]))
  assert out.shape == ref.shape == (2,) + sizes[0] + (5,)
  assert _rel(out, ref) <= TOL


# ----------------------------------------------------------------------------
# PSPNet (hszhao/semseg): PPM + cls, and the auxiliary head
# ----------------------------------------------------------------------------

class PPM(nn.Module):
  """Per bin: AdaptiveAvgPool(b) -> 1x1 conv (no bias) -> BN -> ReLU -> bilinear upsample
  (align_corners=True); output cat([x, bins...])."""

  def __init__(self, cin, reduction, bins):
    super().__init__()
    self.features = nn.ModuleList([
        nn.Sequential(nn.AdaptiveAvgPool2d(b), conv1x1(cin, reduction), nn.BatchNorm2d(reduction),
                      nn.ReLU()) for b in bins])

  def forward(self, x):
    return torch.cat([x] + [up(f(x), x.shape[2:]) for f in self.features], 1)


class TorchPSPHead(nn.Module):
  def __init__(self, cin, reduction, hidden, num_classes, bins=(1, 2, 3, 6)):
    super().__init__()
    self.ppm = PPM(cin, reduction, bins)
    self.cls = nn.Sequential(conv3x3(cin + len(bins) * reduction, hidden), nn.BatchNorm2d(hidden),
                             nn.ReLU(), nn.Dropout2d(0.1), conv1x1(hidden, num_classes, bias=True))

  def forward(self, x):
    return self.cls(self.ppm(x))


def _aux_head(cin, hidden, num_classes):
  # semseg's aux: 3x3 conv (no bias) -> BN -> ReLU -> Dropout2d(0.1) -> 1x1 conv
  return nn.Sequential(conv3x3(cin, hidden), nn.BatchNorm2d(hidden), nn.ReLU(), nn.Dropout2d(0.1),
                       conv1x1(hidden, num_classes, bias=True))


@pytest.mark.parametrize("size", [(9, 11), (5, 4), (13, 13)])
def test_psp_head_matches_torch_reference(size):
  """Map sizes: not a multiple of 6 (overlapping bins), smaller than 6 (repeated rows),
  square odd."""
  feats = _feats({"c5": (2,) + size + (16,)})
  head = heads.PSPHead(num_classes=5, features=8)
  variables, out = _flax_head(head, feats)
  bins = (1, 2, 3, 6)
  table = {f"ppm.features.{i}.1": ("conv", f"pyramid_pooling/bin{b}_conv")
           for i, b in enumerate(bins)}
  table.update({f"ppm.features.{i}.2": ("bn", f"pyramid_pooling/bin{b}_norm")
                for i, b in enumerate(bins)})
  table.update({"cls.0": ("conv", "cls/0"), "cls.1": ("bn", "cls/1"), "cls.4": ("conv", "cls/4")})
  tmodel = _load(TorchPSPHead(16, 8, 8, 5), table, variables)
  with torch.no_grad():
    ref = tu.nhwc(tmodel(_t(feats["c5"])))
  assert out.shape == ref.shape == (2,) + size + (5,)
  assert _rel(out, ref) <= TOL


def test_psp_aux_head_matches_torch_reference():
  feats = _feats({"c4": (2, 9, 11, 12)})
  head = heads.FCNHead(5, in_key="c4", channels=6, channel_dropout=True)
  variables, out = _flax_head(head, feats)
  tmodel = _load(_aux_head(12, 6, 5), {"0": ("conv", "0"), "1": ("bn", "1"), "4": ("conv", "4")},
                 variables)
  with torch.no_grad():
    ref = tu.nhwc(tmodel(_t(feats["c4"])))
  assert _rel(out, ref) <= TOL


# ----------------------------------------------------------------------------
# DeepLab v3+ (tensorflow/models research/deeplab): ASPP (image pooling first) + decoder
# ----------------------------------------------------------------------------

def _conv_bn_relu(cin, cout, k=1, dilation=1):
  conv = conv1x1(cin, cout) if k == 1 else conv3x3(cin, cout, dilation=dilation)
  return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU())


class TorchASPP(nn.Module):
  """Image pooling (global mean -> 1x1 -> BN -> ReLU -> bilinear resize, align_corners) listed
  first, then 1x1 and three dilated 3x3 branches (each conv-BN-ReLU); concat -> 1x1
  projection (conv-BN-ReLU) -> dropout."""

  def __init__(self, cin, features, rates):
    super().__init__()
    self.image_pool = _conv_bn_relu(cin, features)
    self.branches = nn.ModuleList([_conv_bn_relu(cin, features)]
                                  + [_conv_bn_relu(cin, features, 3, r) for r in rates])
    self.project = _conv_bn_relu((2 + len(rates)) * features, features)
    self.dropout = nn.Dropout(0.1)

  def forward(self, x):
    pooled = self.image_pool(x.mean(dim=(2, 3), keepdim=True))
    outs = [up(pooled, x.shape[2:])] + [b(x) for b in self.branches]
    return self.dropout(self.project(torch.cat(outs, 1)))


class TorchDeepLabV3PlusDecoder(nn.Module):
  """ASPP on the stride-16 map, upsampled (align_corners=True) to the stride-4 skip, which
  is reduced by 1x1 conv-BN-ReLU to 48 channels; cat([aspp, skip]); two 3x3 conv-BN-ReLU;
  1x1 classifier with bias."""

  def __init__(self, c_high, c_low, features, skip_features, num_classes, rates):
    super().__init__()
    self.aspp = TorchASPP(c_high, features, rates)
    self.skip = _conv_bn_relu(c_low, skip_features)
    self.decoder = nn.Sequential(_conv_bn_relu(features + skip_features, features, 3),
                                 _conv_bn_relu(features, features, 3))
    self.classifier = conv1x1(features, num_classes, bias=True)

  def forward(self, low, high):
    x = up(self.aspp(high), low.shape[2:])
    return self.classifier(self.decoder(torch.cat([x, self.skip(low)], 1)))


def _v3plus_table(n_rates):
  table = {"aspp.image_pool.0": ("conv", "aspp/convs/0/1"),
           "aspp.image_pool.1": ("bn", "aspp/convs/0/2"),
           "aspp.project.0": ("conv", "aspp/project/0"), "aspp.project.1": ("bn", "aspp/project/1"),
           "skip.0": ("conv", "skip_reduce/0"), "skip.1": ("bn", "skip_reduce/1"),
           "decoder.0.0": ("conv", "fuse1/0"), "decoder.0.1": ("bn", "fuse1/1"),
           "decoder.1.0": ("conv", "fuse2/0"), "decoder.1.1": ("bn", "fuse2/1"),
           "classifier": ("conv", "classifier")}
  for i in range(1 + n_rates):  # flax branch i + 1 (0 is image pooling)
    table[f"aspp.branches.{i}.0"] = ("conv", f"aspp/convs/{i + 1}/0")
    table[f"aspp.branches.{i}.1"] = ("bn", f"aspp/convs/{i + 1}/1")
  return table


@pytest.mark.parametrize("rates,high,low", [
    ((6, 12, 18), (13, 17), (49, 65)),   # OS16 rates; maps of a 193x257 input
    ((2, 3, 5), (9, 7), (33, 25)),       # small rates: every tap lands inside the map
])
def test_deeplabv3plus_head_matches_torch_reference(rates, high, low):
  feats = _feats({"c2": (2,) + low + (10,), "c5": (2,) + high + (24,)})
  head = heads.DeepLabV3PlusHead(num_classes=5, rates=rates, features=16, skip_features=6)
  variables, out = _flax_head(head, feats)
  tmodel = _load(TorchDeepLabV3PlusDecoder(24, 10, 16, 6, 5, rates), _v3plus_table(len(rates)),
                 variables)
  with torch.no_grad():
    ref = tu.nhwc(tmodel(_t(feats["c2"]), _t(feats["c5"])))
  assert out.shape == ref.shape == (2,) + low + (5,)
  assert _rel(out, ref) <= TOL

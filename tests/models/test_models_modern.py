"""The backbone + head models: every name and backbone builds, feature maps follow torch's
conv arithmetic, tiny variants run, learn and reject bad arguments clearly; the layers
they rely on (adaptive pooling, depthwise conv, frozen BatchNorm) equal torch's.

Full-size models are only traced (``jax.eval_shape``); real forward and training runs
use thin variants (``width_multiplier=1/8``, ResNet-18) on 33x45 inputs. Weight parity
of the torchvision-exact models is in ``test_models_torchvision_parity.py``.
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxseg
from jaxseg.convert import from_torch_state_dict
from jaxseg.models import layers
from tests.models import models_testutil as tu

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
F = torch.nn.functional

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
KEYS = ("stem", "c2", "c3", "c4", "c5")
TINY_WIDTH = 1 / 8


def _rel(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _abstract_apply(model, shape):
  """Output of an eval-mode forward pass, traced only (one trace: the init's own forward)."""
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(lambda x: model.init_with_output(tu.key(0), x, train=False)[0], x)


# ----------------------------------------------------------------------------
# Every name and every supported backbone builds (traced only: cheap at full size)
# ----------------------------------------------------------------------------

FAMILY_BACKBONES = (
    [("deeplabv3", b) for b in ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2")]
    + [("deeplabv3plus", b) for b in ("resnet18", "resnet34", "resnet50", "resnet101",
                                      "mobilenet_v2")]
    + [("pspnet", b) for b in ("resnet18", "resnet34", "resnet50", "resnet101")]
    + [("refinenet", b) for b in ("resnet18", "resnet34", "resnet50", "resnet101")]
    + [("deeplabv2", b) for b in ("vgg16", "resnet50", "resnet101")]
    + [(n, None) for n in ("fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50",
                           "deeplabv3_resnet101")])
# The other registered semantic models, at their default settings.
OTHERS = [(n, None) for n in jaxseg.models.names()
          if n != "maskrcnn" and n not in {f for f, _ in FAMILY_BACKBONES}]
WITH_AUX = ("deeplabv3", "deeplabv3plus", "pspnet", "fcn_resnet50", "fcn_resnet101",
            "deeplabv3_resnet50", "deeplabv3_resnet101")


def test_the_build_cases_cover_every_registered_name():
  covered = {n for n, _ in FAMILY_BACKBONES + OTHERS}
  assert covered == set(jaxseg.models.names()) - {"maskrcnn"}
  assert {"fcn8s", "unet", "segnet", "dilation", "deeplabv1"} <= covered


@pytest.mark.parametrize("name,backbone", FAMILY_BACKBONES + OTHERS,
                         ids=[f"{n}-{b}" if b else n for n, b in FAMILY_BACKBONES + OTHERS])
def test_every_model_and_backbone_gives_input_size_logits_at_an_odd_size(name, backbone):
  """Traced at full size (``jax.eval_shape``); aux logits too where the family has them."""
  kwargs = {} if backbone is None else {"backbone": backbone}
  if name in WITH_AUX:
    kwargs["aux"] = True
  model = jaxseg.models.build(name, num_classes=4, **kwargs)
  x = jax.ShapeDtypeStruct((2, 35, 41, 3), jnp.float32)
  # One trace: the init's forward pass, with the aux head's sown logits kept.
  logits, variables = jax.eval_shape(lambda x: model.init_with_output(
      tu.key(0), x, train=False, mutable=["params", "batch_stats", "intermediates"]), x)
  assert logits.shape == (2, 35, 41, 4) and logits.dtype == jnp.float32
  if name in WITH_AUX:
    (aux,) = variables["intermediates"]["aux_logits"]
    assert aux.shape == (2, 35, 41, 4) and aux.dtype == jnp.float32
  else:
    assert "intermediates" not in variables


# ----------------------------------------------------------------------------
# Feature-map sizes: torch's conv arithmetic (torch modules on the meta device)
# ----------------------------------------------------------------------------

def _dilate_mobilenet_v2(tmodel, output_stride):
  """TF DeepLab's output-stride rule (slim mobilenet ``current_stride == output_stride``) on
  a torchvision MobileNetV2: once the stride is reached, a layer that would stride keeps
  stride 1 at the current rate, and the rate is multiplied by its stride for later layers."""
  current, rate = 1, 1
  for block in tmodel.features:
    convs = [m for m in block.modules() if isinstance(m, torch.nn.Conv2d)]
    conv = next((m for m in convs if m.groups > 1), convs[0])  # the strided conv
    stride = conv.stride[0]
    if current == output_stride:
      layer_stride, layer_rate = 1, rate
      rate *= stride
    else:
      layer_stride, layer_rate = stride, 1
      current *= stride
    k = conv.kernel_size[0]
    conv.stride = (layer_stride, layer_stride)
    conv.dilation = (layer_rate, layer_rate)
    conv.padding = (layer_rate * (k - 1) // 2,) * 2
  return tmodel


def _torch_features(name, output_stride, x):
  """{key: NCHW tensor} of the torch counterpart of ``build_backbone(name, output_stride)``."""
  if name == "resnet50":
    rswd = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}
    m = torchvision.models.resnet50(replace_stride_with_dilation=rswd[output_stride]).eval()
    out = {"stem": m.maxpool(m.relu(m.bn1(m.conv1(x))))}
    y = out["stem"]
    for i in range(1, 5):
      y = out[f"c{i + 1}"] = getattr(m, f"layer{i}")(y)
    return out
  if name == "mobilenet_v2":
    m = _dilate_mobilenet_v2(torchvision.models.mobilenet_v2(), output_stride).eval()
    return _tap(m.features, MOBILENET_TAPS, x)
  # torchvision vgg16: 2x2 floor-mode pools at features 4, 9, 16, 23, 30. OS16 makes pool5
  # a 3x3 stride-1 pool; OS8 also pool4, and dilates conv5 by 2 (DeepLab v1).
  m = torchvision.models.vgg16().features.eval()
  if output_stride <= 16:
    m[30] = torch.nn.MaxPool2d(3, 1, 1)
  if output_stride == 8:
    m[23] = torch.nn.MaxPool2d(3, 1, 1)
    for i in (24, 26, 28):
      m[i].dilation, m[i].padding = (2, 2), (2, 2)
  return _tap(m, {4: "stem", 9: "c2", 16: "c3", 23: "c4", 30: "c5"}, x)


def _tap(layers_, taps, x):
  out = {}
  for i, layer in enumerate(layers_):
    x = layer(x)
    if i in taps:
      out[taps[i]] = x
    if i == max(taps):
      return out


MOBILENET_TAPS = {1: "stem", 3: "c2", 6: "c3", 13: "c4", 17: "c5"}
NOMINAL = {"resnet50": (4, 4, 8, 16, 32), "mobilenet_v2": (2, 4, 8, 16, 32),
           "vgg16": (2, 4, 8, 16, 32)}


@pytest.mark.parametrize("output_stride", [8, 16, 32])
@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2", "vgg16"])
def test_backbone_feature_sizes_follow_torch_conv_arithmetic(name, output_stride):
  h, w = 33, 50  # odd / even-with-odd-halves: ceil and floor differ at every stride
  bb = jaxseg.models.build_backbone(name, output_stride=output_stride)
  feats = _abstract_apply(bb, (1, h, w, 3))
  with torch.device("meta"), torch.no_grad():
    ref = _torch_features(name, output_stride, torch.empty(1, 3, h, w))
  for key in KEYS:
    n, c, rh, rw = ref[key].shape
    assert feats[key].shape == (1, rh, rw, c), (key, feats[key].shape, ref[key].shape)
  for key, nominal in zip(KEYS, NOMINAL[name]):
    stride = min(nominal, output_stride)
    if name == "vgg16":
      # torchvision VGG pools in floor mode: a stride-s map is floor(H / s).
      expected = (h // stride, w // stride)
    else:
      # padded stride-2 convs and pools (k=3 p=1, k=7 p=3, k=1 p=0) all give ceil(H / 2).
      expected = (math.ceil(h / stride), math.ceil(w / stride))
    assert feats[key].shape[1:3] == expected, (key, stride)


def test_dilated_mobilenet_v2_matches_torch_with_the_tf_output_stride_rule():
  """Values, not just sizes: the depthwise rates of a dilated MobileNetV2 (OS8: blocks 7-13
  at rate 2 with block 7 at rate 1, blocks 14-17 at rate 4 with block 14 at rate 2)."""
  torch.manual_seed(0)
  tmodel = tu.randomise_batch_norms(_dilate_mobilenet_v2(
      torchvision.models.mobilenet_v2(width_mult=0.5), 8)).eval()
  bb = jaxseg.models.build_backbone("mobilenet_v2", output_stride=8, width_multiplier=0.5)
  sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  variables = from_torch_state_dict(
      bb, sd, rename=lambda k: None if k.startswith(("features.18.", "classifier.")) else k)
  images = np.random.RandomState(0).uniform(size=(1, 33, 50, 3)).astype(np.float32)
  feats = jax.jit(functools.partial(bb.apply, train=False))(variables, jnp.asarray(images))
  with torch.no_grad():
    ref = _tap(tmodel.features, MOBILENET_TAPS, torch.from_numpy(tu.nchw((images - MEAN) / STD)))
  for key in KEYS:
    assert feats[key].shape == tu.nhwc(ref[key]).shape, key
    assert _rel(feats[key], tu.nhwc(ref[key])) <= 1e-4, key


# ----------------------------------------------------------------------------
# Tiny variants: a real forward pass, gradients, one-batch overfitting
# ----------------------------------------------------------------------------

# (DeepLab v3 on a thin ResNet-18 trains in ``tests/train/test_train_aux.py``, with its aux
# head; the torchvision-exact fcn/deeplabv3_resnet50/101 run at full size in the parity tests.)
TINY = {
    "deeplabv3plus-resnet18": ("deeplabv3plus", dict(backbone="resnet18")),
    "deeplabv3plus-mobilenet_v2": ("deeplabv3plus", dict(backbone="mobilenet_v2")),
    "pspnet-resnet18": ("pspnet", dict(backbone="resnet18", aux=False)),
    "refinenet-resnet18": ("refinenet", dict(backbone="resnet18")),
    "deeplabv2-resnet50": ("deeplabv2", dict(backbone="resnet50")),
    "fcn_resnet50": ("fcn_resnet50", dict(aux=False)),
}
# Adam steps for the one-batch overfit; the other cases take one step (forward + gradients).
FIT_STEPS = {"deeplabv3plus-resnet18": 80, "deeplabv3plus-mobilenet_v2": 80,
             "pspnet-resnet18": 80, "refinenet-resnet18": 80}
# RefineNet's head has no normalisation (sums of residual units and pooling chains) and its
# tiny variant stalls at the class prior with Adam 3e-3; 1e-3 fits it.
LR = {"refinenet-resnet18": 1e-3}
FORWARD_ONLY = {"deeplabv2-resnet50"}
# On a CPU, compiling these programs costs far more than running them a few dozen times:
# XLA's backend optimisation level 0 halves the compile time. (RefineNet's 5x5 pooling
# chains run 4x slower unoptimised, so its 80 steps keep the default.)
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.lru_cache(maxsize=None)
def _fit(case):
  """A thin variant trained with Adam on mean CE (train mode, dropout on).

  Returns a dict: ``variables`` (initial), ``losses``, ``accs`` (pixel accuracy of each
  step's train-mode logits), and the first step's ``logits`` and ``grads``.
  """
  name, kwargs = TINY[case]
  model = jaxseg.models.build(name, num_classes=3, width_multiplier=TINY_WIDTH, **kwargs)
  images, labels = tu.toy_batch(n=2, h=33, w=45, num_classes=3, block=12)
  if case in FORWARD_ONLY:  # an eval-mode forward pass only (it comes with the init)
    logits, variables = jax.jit(functools.partial(model.init_with_output, train=False),
                                compiler_options=FAST_COMPILE)(tu.key(0), images)
    return {"logits": logits, "variables": variables}
  variables = jax.jit(functools.partial(model.init, train=False),
                      compiler_options=FAST_COMPILE)(tu.key(0), images)
  params, stats = variables["params"], variables["batch_stats"]
  tx = optax.adam(LR.get(case, 3e-3))
  opt = tx.init(params)

  def step(params, stats, opt, rng):
    def loss_fn(p):
      logits, upd = model.apply({"params": p, "batch_stats": stats}, images, train=True,
                                mutable=["batch_stats"], rngs={"dropout": rng})
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, (upd["batch_stats"], logits)
    (loss, (stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    acc = jnp.mean(jnp.argmax(logits, -1) == labels)
    return optax.apply_updates(params, updates), stats, opt, loss, acc, logits, grads

  step = jax.jit(step, compiler_options=None if case.startswith("refinenet") else FAST_COMPILE)
  out = {"losses": [], "accs": [], "variables": variables}
  for i in range(FIT_STEPS.get(case, 1)):
    params, stats, opt, loss, acc, logits, grads = step(params, stats, opt, tu.key(i + 1))
    if i == 0:
      out["logits"], out["grads"] = logits, grads
    out["losses"].append(float(loss))
    out["accs"].append(float(acc))
  return out


@pytest.mark.parametrize("case", sorted(TINY))
def test_tiny_variant_forward_is_finite_at_input_size(case):
  fit = _fit(case)
  logits = fit["logits"]
  assert logits.shape == (2, 33, 45, 3) and logits.dtype == jnp.float32
  logits = np.asarray(logits)
  assert np.all(np.isfinite(logits))
  # Depends on the input: the two images of the batch get different logits.
  assert np.abs(logits[0] - logits[1]).max() > 1e-6
  assert set(fit["variables"]) == {"params", "batch_stats"}


def _first_conv(tree, case):
  if "mobilenet_v2" in case:
    return tree["backbone"]["features"]["0"]["0"]["kernel"]
  return tree["backbone"]["conv1"]["kernel"]


@pytest.mark.parametrize("case", sorted(set(TINY) - FORWARD_ONLY))
def test_gradient_reaches_the_first_conv_and_every_parameter(case):
  first = _fit(case)["grads"]
  assert np.abs(np.asarray(_first_conv(first, case))).max() > 0
  flat = jax.tree_util.tree_flatten_with_path(first)[0]
  for path, g in flat:
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
    # No dead branch: every parameter array takes part in the loss.
    assert np.abs(g).max() > 0, jax.tree_util.keystr(path)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(FIT_STEPS))
def test_tiny_variant_overfits_one_batch(case):
  losses, accs = _fit(case)["losses"], _fit(case)["accs"]
  # Dropout stays on, so the last step is noisy: 4x lower loss, 90% of the pixels right
  # (80 steps typically reach ~0.1 and ~97%).
  assert losses[-1] < 0.25 * losses[0], losses[::10]
  assert accs[-1] >= 0.9, accs[::10]


# ----------------------------------------------------------------------------
# Clear errors
# ----------------------------------------------------------------------------

RESNETS = "resnet18, resnet34, resnet50, resnet101"


@pytest.mark.parametrize("name,backbone,supported", [
    ("deeplabv3", "resnet152", RESNETS + ", mobilenet_v2"),
    ("deeplabv3plus", "vgg16", RESNETS + ", mobilenet_v2"),
    ("pspnet", "mobilenet_v2", RESNETS),
    ("refinenet", "vgg16", RESNETS),
    ("deeplabv2", "mobilenet_v2", "vgg16, resnet50, resnet101"),
    ("deeplabv2", "resnet18", "vgg16, resnet50, resnet101"),
])
def test_unsupported_backbone_names_the_supported_ones(name, backbone, supported):
  with pytest.raises(ValueError, match=f"{backbone}.*supported: {supported}"):
    jaxseg.models.build(name, num_classes=3, backbone=backbone)


def test_unknown_backbone_name_lists_valid_ones():
  with pytest.raises(ValueError, match="unknown backbone 'resnet152'; valid: resnet18, "
                     "resnet34, resnet50, resnet101, mobilenet_v2, vgg16"):
    jaxseg.models.build_backbone("resnet152")


@pytest.mark.parametrize("name,kwargs,supported", [
    ("refinenet", dict(output_stride=8), "32"),
    ("refinenet", dict(output_stride=16), "32"),
    ("deeplabv3", dict(output_stride=32), "8, 16"),
    ("deeplabv3plus", dict(output_stride=32), "8, 16"),
    ("deeplabv3plus", dict(output_stride=4, backbone="mobilenet_v2"), "8, 16"),
    ("pspnet", dict(output_stride=32), "8, 16"),
])
def test_unsupported_output_stride_of_a_family(name, kwargs, supported):
  with pytest.raises(ValueError, match=f"{name}: output_stride {kwargs['output_stride']} is "
                     f"not supported; supported: {supported}$"):
    jaxseg.models.build(name, num_classes=3, **kwargs)


@pytest.mark.parametrize("name", ["resnet50", "resnet18", "mobilenet_v2", "vgg16"])
@pytest.mark.parametrize("output_stride", [4, 64, 12])
def test_backbone_rejects_output_strides_other_than_8_16_32(name, output_stride):
  with pytest.raises(ValueError, match=rf"output_stride must be one of \(8, 16, 32\), got "
                     f"{output_stride}"):
    jaxseg.models.build_backbone(name, output_stride=output_stride)


def test_vgg16_backbone_has_no_classifier():
  with pytest.raises(ValueError, match="vgg16: no ImageNet classifier head"):
    jaxseg.models.build_backbone("vgg16", num_classes=10)


def test_state_dict_errors_list_missing_unexpected_and_misshaped_together():
  torch.manual_seed(0)
  sd = {k: v.numpy() for k, v in torchvision.models.resnet18().state_dict().items()}
  bb = jaxseg.models.build_backbone("resnet18", num_classes=1000)
  from_torch_state_dict(bb, sd)  # the intact dict converts
  del sd["layer2.0.bn1.running_var"]
  sd["layer4.2.conv1.weight"] = np.zeros((512, 512, 3, 3), np.float32)
  sd["layer3.1.conv2.weight"] = np.zeros((256, 256, 1, 1), np.float32)
  with pytest.raises(
      ValueError, match="from_torch_state_dict: state dict does not match ResNet\n") as err:
    from_torch_state_dict(bb, sd)
  msg = str(err.value)
  assert "missing (1): layer2.0.bn1.running_var" in msg
  assert "unexpected (1): layer4.2.conv1.weight" in msg
  assert "mis-shaped (1): layer3.1.conv2.weight" in msg
  assert "expected (3, 3, 256, 256)" in msg


# ----------------------------------------------------------------------------
# Layers against torch
# ----------------------------------------------------------------------------

_adaptive = jax.jit(layers.adaptive_avg_pool, static_argnums=1)


@pytest.mark.parametrize("h,w", [(1, 1), (2, 5), (5, 3), (6, 12), (7, 13), (13, 9), (4, 6)])
def test_adaptive_avg_pool_matches_torch(h, w):
  x = np.random.RandomState(h * 31 + w).randn(2, h, w, 3).astype(np.float32)
  for bins in (1, 2, 3, 6):
    got = _adaptive(jnp.asarray(x), bins)
    ref = tu.nhwc(torch.nn.AdaptiveAvgPool2d(bins)(torch.from_numpy(tu.nchw(x))))
    assert got.shape == (2, bins, bins, 3)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6, err_msg=str(bins))


def test_adaptive_avg_pool_rejects_zero_bins():
  with pytest.raises(ValueError, match="bins must be >= 1"):
    layers.adaptive_avg_pool(jnp.zeros((1, 4, 4, 1)), 0)


@pytest.mark.parametrize("k,stride,dilation,h,w", [
    # every size has an odd and an even side
    (3, 1, 1, 10, 7), (3, 2, 1, 9, 12), (3, 2, 1, 10, 7), (3, 1, 2, 9, 12), (3, 2, 2, 10, 7),
    (3, 2, 2, 9, 12), (5, 2, 1, 9, 12)])
def test_depthwise_conv_and_its_gradients_match_torch_grouped_conv(k, stride, dilation, h, w):
  rng = np.random.RandomState(k * 100 + stride * 10 + dilation + h)
  c = 5
  x = rng.randn(2, h, w, c).astype(np.float32)
  wt = rng.randn(c, 1, k, k).astype(np.float32)  # torch layout [C, 1, k, k]
  conv = layers.DepthwiseConv(k, stride, dilation)

  def f(x, kernel):
    return conv.apply({"params": {"kernel": kernel}}, x)

  y, vjp = jax.vjp(jax.jit(f), jnp.asarray(x), jnp.asarray(wt.transpose(2, 3, 1, 0)))
  tx = torch.from_numpy(tu.nchw(x)).requires_grad_()
  tw = torch.from_numpy(wt).requires_grad_()
  ty = F.conv2d(tx, tw, stride=stride, padding=dilation * (k - 1) // 2, dilation=dilation,
                groups=c)
  assert y.shape == tu.nhwc(ty).shape
  np.testing.assert_allclose(np.asarray(y), tu.nhwc(ty), rtol=1e-5, atol=1e-5)
  cot = rng.randn(*y.shape).astype(np.float32)
  gx, gk = vjp(jnp.asarray(cot))
  ty.backward(torch.from_numpy(tu.nchw(cot)))
  np.testing.assert_allclose(np.asarray(gx), tu.nhwc(tx.grad), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gk), tw.grad.numpy().transpose(2, 3, 1, 0),
                             rtol=1e-4, atol=1e-4)


class _ConvFrozenBN(nn.Module):
  """conv "0" -> FrozenBatchNorm "1", the torch ``Sequential(Conv2d, FrozenBatchNorm2d)``."""
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = layers.conv2d(6, 3, name="0", use_bias=True)(x)
    return layers.FrozenBatchNorm(use_running_average=not train, epsilon=self.epsilon,
                                  name="1")(x)


@pytest.mark.parametrize("eps", [1e-5, 0.0])
def test_frozen_batch_norm_matches_torchvision_and_converts(eps):
  torch.manual_seed(0)
  fbn = torchvision.ops.misc.FrozenBatchNorm2d(6, eps=eps)
  with torch.no_grad():
    fbn.weight.copy_(torch.rand(6) + 0.5)
    fbn.bias.copy_(torch.rand(6) - 0.5)
    fbn.running_mean.copy_(torch.rand(6) - 0.5)
    # Small variances make eps matter: eps 0 and 1e-5 differ by far more than the tolerance.
    fbn.running_var.copy_(torch.rand(6) * 1e-4 + 1e-5)
  tmodel = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), fbn).eval()
  sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  assert set(sd) == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean",
                     "1.running_var"}
  model = _ConvFrozenBN(epsilon=eps)
  variables = from_torch_state_dict(model, sd, sample_input_shape=(1, 8, 8, 3))
  # The frozen affine lives in batch_stats: the optimizer never sees it.
  assert set(variables["params"]) == {"0"}
  assert set(variables["batch_stats"]["1"]) == {"scale", "bias", "mean", "var"}
  np.testing.assert_array_equal(variables["batch_stats"]["1"]["var"], sd["1.running_var"])
  x = np.random.RandomState(1).randn(2, 7, 9, 3).astype(np.float32)
  with torch.no_grad():
    ref = tu.nhwc(tmodel(torch.from_numpy(tu.nchw(x))))
  got = model.apply(variables, jnp.asarray(x), train=False)
  assert _rel(got, ref) <= 1e-5
  other = _ConvFrozenBN(epsilon=1e-5 if eps == 0.0 else 0.0)
  assert _rel(other.apply(variables, jnp.asarray(x), train=False), ref) > 1e-2
  # Training mode: the same output and no statistic moves.
  out, mutated = model.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
  assert _rel(out, ref) <= 1e-5
  for key in ("scale", "bias", "mean", "var"):
    np.testing.assert_array_equal(mutated["batch_stats"]["1"][key],
                                  variables["batch_stats"]["1"][key])

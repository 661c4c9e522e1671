"""Parity with torchvision: the same weights give the same logits.

torchvision models are built with ``weights=None`` (no download), their BatchNorm
running statistics and affine parameters set to non-trivial random values, converted
with ``jaxseg.convert.from_torch_state_dict`` and compared on random images at two
sizes (one odd): max |jax - torch| / max |torch| <= 1e-4, logits and aux logits.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseg
from jaxseg.convert import from_torch_state_dict
from tests.models import models_testutil as tu

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
seg = torchvision.models.segmentation

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
TOL = 1e-4


def _state_dict(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _torch_input(images):
  return torch.from_numpy(tu.nchw((images - MEAN) / STD))


def _images(shape, seed=0):
  return np.random.RandomState(seed).uniform(size=shape).astype(np.float32)


def _rel(a, b):
  return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


SEGMENTATION = [
    ("fcn_resnet50", seg.fcn_resnet50, [(2, 64, 64), (1, 67, 45)]),
    ("deeplabv3_resnet50", seg.deeplabv3_resnet50, [(2, 64, 64), (1, 67, 45)]),
    ("fcn_resnet101", seg.fcn_resnet101, [(2, 48, 48), (1, 41, 35)]),
    ("deeplabv3_resnet101", seg.deeplabv3_resnet101, [(2, 48, 48), (1, 41, 35)]),
]


@pytest.mark.parametrize("name,tv_builder,sizes", SEGMENTATION, ids=[c[0] for c in SEGMENTATION])
def test_segmentation_models_match_torchvision(name, tv_builder, sizes):
  torch.manual_seed(0)
  tmodel = tu.randomise_batch_norms(tv_builder(weights=None, weights_backbone=None, num_classes=7,
                                       aux_loss=True)).eval()
  model = jaxseg.models.build(name, num_classes=7)
  variables = from_torch_state_dict(model, _state_dict(tmodel))
  assert tu.param_count(variables["params"]) == sum(
      p.numel() for p in tmodel.parameters())
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]))
  for n, h, w in sizes:
    images = _images((n, h, w, 3), seed=h)
    logits, inter = apply(variables, jnp.asarray(images))
    (aux,) = inter["intermediates"]["aux_logits"]
    with torch.no_grad():
      ref = tmodel(_torch_input(images))
    assert logits.shape == (n, h, w, 7)
    assert _rel(logits, tu.nhwc(ref["out"])) <= TOL
    assert _rel(aux, tu.nhwc(ref["aux"])) <= TOL


def _no_dropout(next_fun, args, kwargs, context):
  if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
    return args[0]
  return next_fun(*args, **kwargs)


def test_training_mode_forward_matches_torchvision():
  """Batch statistics in training mode (dropout switched off on both sides)."""
  torch.manual_seed(1)
  tmodel = tu.randomise_batch_norms(seg.deeplabv3_resnet50(weights=None, weights_backbone=None,
                                                   num_classes=5, aux_loss=True))
  for m in tmodel.modules():
    if isinstance(m, torch.nn.Dropout):
      m.p = 0.0
  tmodel.train()
  model = jaxseg.models.build("deeplabv3_resnet50", num_classes=5)
  variables = from_torch_state_dict(model, _state_dict(tmodel))
  images = _images((2, 49, 37, 3), seed=3)
  with nn.intercept_methods(_no_dropout):
    (logits, mutated) = model.apply(variables, jnp.asarray(images), train=True,
                                    mutable=["batch_stats", "intermediates"])
  with torch.no_grad():
    ref = tmodel(_torch_input(images))
  assert _rel(logits, tu.nhwc(ref["out"])) <= TOL
  assert _rel(mutated["intermediates"]["aux_logits"][0], tu.nhwc(ref["aux"])) <= TOL
  # The running means move the same way (torch momentum 0.1 == flax 0.9); the variances
  # differ by design (torch stores the unbiased batch variance).
  got = mutated["batch_stats"]["backbone"]["bn1"]["mean"]
  assert _rel(got, tmodel.backbone.bn1.running_mean.numpy()) <= TOL


CLASSIFIERS = [
    ("resnet50", lambda: torchvision.models.resnet50(weights=None), dict()),
    ("resnet18", lambda: torchvision.models.resnet18(weights=None), dict()),
    ("mobilenet_v2", lambda: torchvision.models.mobilenet_v2(weights=None), dict()),
]


@pytest.mark.parametrize("name,tv_builder,kwargs", CLASSIFIERS, ids=[c[0] for c in CLASSIFIERS])
def test_backbone_classifiers_match_torchvision(name, tv_builder, kwargs):
  torch.manual_seed(2)
  tmodel = tu.randomise_batch_norms(tv_builder()).eval()
  bb = jaxseg.models.build_backbone(name, num_classes=1000, **kwargs)
  variables = from_torch_state_dict(bb, _state_dict(tmodel))
  assert tu.param_count(variables["params"]) == sum(p.numel() for p in tmodel.parameters())
  apply = jax.jit(lambda v, x: bb.apply(v, x, train=False))
  for shape in [(2, 64, 64, 3), (1, 71, 53, 3)]:
    images = _images(shape, seed=shape[1])
    feats = apply(variables, jnp.asarray(images))
    with torch.no_grad():
      ref = tmodel(_torch_input(images)).numpy()
    assert _rel(feats["logits"], ref) <= TOL


def test_dilated_resnet_features_match_torchvision_dilation():
  """output_stride 8/16 equals torchvision's replace_stride_with_dilation."""
  torch.manual_seed(3)
  for os_, rswd in ((16, [False, False, True]), (8, [False, True, True])):
    tmodel = tu.randomise_batch_norms(torchvision.models.resnet50(
        weights=None, replace_stride_with_dilation=rswd)).eval()
    bb = jaxseg.models.build_backbone("resnet50", output_stride=os_)
    sd = {k: v for k, v in _state_dict(tmodel).items() if not k.startswith("fc.")}
    variables = from_torch_state_dict(bb, sd)
    images = _images((1, 53, 61, 3), seed=os_)
    feats = bb.apply(variables, jnp.asarray(images), train=False)
    x = _torch_input(images)
    with torch.no_grad():
      t = tmodel.maxpool(tmodel.relu(tmodel.bn1(tmodel.conv1(x))))
      for i in range(1, 5):
        t = getattr(tmodel, f"layer{i}")(t)
        assert _rel(feats[f"c{i + 1}"], tu.nhwc(t)) <= TOL, (os_, i)
    assert feats["c5"].shape[1:3] == ((53 - 1) // os_ + 1, (61 - 1) // os_ + 1)

"""bench/twins.py: PyTorch twins of jaxseg's semantic models.

Every benchmark case: the twin's trainable parameter count and parameter names equal
jaxseg's (``jax.eval_shape`` of ``init``, nothing computed) and its output / aux shapes on a
1x3x64x64 input equal jaxseg's (torch's meta device, nothing computed). Then the twins are
checked as functions: jaxseg's parameters (randomised, so FCN's zero score layers do not
hide anything) are copied into the twin by name and both forwards must agree on odd-sized
inputs, for thin VGG-family models and for the ResNet/MobileNetV2 heads on resnet18 /
mobilenet_v2 (the full-width ResNet-101 cases would take minutes to compile).
"""
import pathlib
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch twins need torch (test extra)")
pytest.importorskip("torchvision", reason="the PyTorch twins need torchvision (test extra)")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import traverse_util  # noqa: E402

import jaxseg  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "bench"))
import twins  # noqa: E402

NUM_CLASSES = 5


def _label(name, kwargs):
  return "/".join([name] + [str(v) for v in kwargs.values()])


def _jax_shapes(name, kwargs, shape):
  """(logits shape NCHW, aux shape NCHW or None, params pytree of ShapeDtypeStructs)."""
  model = jaxseg.models.build(name, num_classes=NUM_CLASSES, **kwargs)
  images = jax.ShapeDtypeStruct(shape, jnp.float32)
  # mutable=True: flax's init leaves ``intermediates`` (where the aux logits are sown) out.
  out, variables = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x, train=False, mutable=True), images)
  aux = jaxseg.train.step.collect_aux_logits(variables.get("intermediates", {}))
  assert len(aux) <= 1, "no jaxseg model has several aux heads; extend the test when one does"
  nchw = lambda s: (s[0], s[3], s[1], s[2])
  return nchw(out.shape), nchw(aux[0].shape) if aux else None, variables["params"]


def _torch_key(path):
  leaf = {"kernel": "weight", "scale": "weight"}.get(path[-1], path[-1])
  return ".".join(path[:-1] + (leaf,))


def _train_deterministic(model):
  """Train mode (so the aux head runs) with BatchNorm on running stats and no dropout."""
  model.train()
  for m in model.modules():
    if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.Dropout,
                      torch.nn.Dropout2d)):
      m.eval()
  return model


def test_cases_cover_every_registered_semantic_model():
  covered = {name for name, _ in twins.CASES}
  missing = set(jaxseg.models.names()) - covered - {"maskrcnn"}
  assert not missing, f"registered models without a benchmark case: {sorted(missing)}"


@pytest.mark.parametrize("name,kwargs", twins.CASES,
                         ids=[_label(n, k) for n, k in twins.CASES])
def test_twin_matches_parameters_and_shapes(name, kwargs):
  jax_out, jax_aux, params = _jax_shapes(name, kwargs, (1, 64, 64, 3))
  jax_leaves = traverse_util.flatten_dict(params)
  with torch.device("meta"):
    model = twins.twin(name, kwargs, NUM_CLASSES)
  assert model is not None, f"{_label(name, kwargs)} has no twin"

  torch_params = dict(model.named_parameters())
  assert (sum(p.numel() for p in torch_params.values())
          == sum(int(np.prod(a.shape)) for a in jax_leaves.values()))
  # Same layers: every jaxseg parameter has a torch parameter of the same size and name.
  assert {_torch_key(p): int(np.prod(a.shape)) for p, a in jax_leaves.items()} == {
      k: p.numel() for k, p in torch_params.items()}

  x = torch.zeros(1, 3, 64, 64, device="meta")
  out = _train_deterministic(model)(x)
  if jax_aux is None:
    assert isinstance(out, torch.Tensor)
    assert tuple(out.shape) == jax_out
  else:
    assert set(out) == {"out", "aux"}
    assert tuple(out["out"].shape) == jax_out
    assert tuple(out["aux"].shape) == jax_aux
    # jaxseg evaluates the aux head in training only; so does the twin.
    assert set(model.eval()(x)) == {"out"}


def _random_params(shapes, seed):
  """Params of jaxseg's shapes, every leaf drawn: He-scaled kernels, BN scale ~1, small
  biases (jaxseg's own init zeroes FCN's score layers, which would hide everything)."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(shapes)
  for path, a in flat.items():
    if len(a.shape) >= 2:
      fan_in = int(np.prod(a.shape[:-1]))
      flat[path] = rng.normal(0, np.sqrt(2 / fan_in), a.shape).astype(np.float32)
    elif path[-1] == "scale":
      flat[path] = (1 + 0.1 * rng.normal(size=a.shape)).astype(np.float32)
    else:
      flat[path] = (0.1 * rng.normal(size=a.shape)).astype(np.float32)
  return traverse_util.unflatten_dict(flat)


def _load_into(model, params):
  """Copies jaxseg params into the twin by name (HWIO -> OIHW; up-convs -> [I,O,k,k])."""
  flat = traverse_util.flatten_dict(params)
  state = {}
  for path, a in flat.items():
    key = _torch_key(path)
    if a.ndim == 4:
      owner = model.get_submodule(key.rsplit(".", 1)[0])
      axes = (2, 3, 0, 1) if isinstance(owner, torch.nn.ConvTranspose2d) else (3, 2, 0, 1)
      a = np.transpose(a, axes)
    state[key] = torch.from_numpy(np.ascontiguousarray(a))
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert not unexpected
  # Only buffers (BN running stats at their init, frozen bilinear kernels) stay as built.
  assert all(k not in dict(model.named_parameters()) for k in missing)


THIN = dict(width_multiplier=1 / 16)
FUNCTION_CASES = [
    ("unet", dict(features=4, depth=2), (23, 30)),
    ("segnet", THIN, (21, 27)),
    ("fcn32s", dict(THIN, fc_features=32), (21, 27)),
    ("fcn16s", dict(THIN, fc_features=32), (21, 27)),
    ("fcn8s", dict(THIN, fc_features=32), (21, 27)),
    ("dilation", dict(THIN, fc_features=32), (13, 19)),
    ("deeplabv1", dict(THIN, fc_features=32), (21, 27)),
    ("deeplabv2", dict(THIN, fc_features=32, backbone="vgg16"), (21, 27)),
    ("deeplabv3", dict(backbone="resnet18", aux=True), (37, 45)),
    ("deeplabv3plus", dict(backbone="resnet18", output_stride=8), (37, 45)),
    ("deeplabv3plus", dict(backbone="mobilenet_v2"), (37, 45)),
    ("pspnet", dict(backbone="resnet18"), (37, 45)),
    # The paper's 2 CRP stages / 1 output RCU: the same loops as released (4 / 3), half the
    # program to compile.
    ("refinenet", dict(backbone="resnet18", crp_stages=2, output_rcus=1), (37, 45)),
]


@pytest.mark.parametrize("name,kwargs,size", FUNCTION_CASES,
                         ids=[_label(n, k) for n, k, _ in FUNCTION_CASES])
def test_twin_computes_what_jaxseg_computes(name, kwargs, size):
  model = jaxseg.models.build(name, num_classes=NUM_CLASSES, **kwargs)
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(2, *size, 3)).astype(np.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  variables = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)
  if "batch_stats" in variables:  # BatchNorm at init: mean 0, var 1 (as torch's buffers)
    variables["batch_stats"] = jax.tree_util.tree_map_with_path(
        lambda path, a: np.ones_like(a) if path[-1].key == "var" else a,
        variables["batch_stats"])
  variables["params"] = _random_params(shapes["params"], seed=1)
  # One jitted program: op-by-op execution of a whole ResNet compiles every op separately.
  out, state = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]))(
      variables, images)
  aux = jaxseg.train.step.collect_aux_logits(state.get("intermediates", {}))

  twin = twins.twin(name, kwargs, NUM_CLASSES)
  _load_into(twin, variables["params"])
  mean = np.asarray(jaxseg.models.layers.IMAGENET_MEAN, np.float32)
  std = np.asarray(jaxseg.models.layers.IMAGENET_STD, np.float32)
  x = torch.from_numpy(((images - mean) / std).transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    got = _train_deterministic(twin)(x)
  if aux:
    got, got_aux = got["out"], got["aux"]
    want_aux = np.asarray(aux[0]).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got_aux.numpy(), want_aux, rtol=1e-3,
                               atol=1e-4 * np.abs(want_aux).max())
  want = np.asarray(out).transpose(0, 3, 1, 2)
  assert np.abs(want).max() > 0
  np.testing.assert_allclose(got.numpy(), want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


def test_reflect_indices_match_numpy_for_any_padding():
  for n, before, after in [(1, 3, 4), (2, 5, 0), (5, 186, 190), (64, 186, 186)]:
    want = np.pad(np.arange(n), (before, after), mode="reflect")
    np.testing.assert_array_equal(twins.reflect_indices(n, before, after).numpy(), want)


def test_bilinear_kernel_is_caffe_upsample_filt():
  # k=4 (x2): factor 2, centre 1.5 -> 1D weights 0.25, 0.75, 0.75, 0.25 (hand computed).
  w = twins.bilinear_kernel(4, 3)
  f = np.array([0.25, 0.75, 0.75, 0.25])
  np.testing.assert_allclose(w[1, 1].numpy(), np.outer(f, f))
  assert w[0, 1].abs().sum() == 0
  # Odd k=3: factor 2, centre 1 -> 0.5, 1, 0.5; grouped layout [C,1,k,k].
  g = twins.bilinear_kernel(3, 2, grouped=True)
  assert g.shape == (2, 1, 3, 3)
  np.testing.assert_allclose(g[1, 0].numpy(), np.outer([0.5, 1, 0.5], [0.5, 1, 0.5]))


def test_twin_returns_none_without_twin_and_rejects_bad_input():
  assert twins.twin("maskrcnn", {}, NUM_CLASSES) is None
  assert twins.twin("fcn_resnet50", {"width_multiplier": 0.5}, NUM_CLASSES) is None
  assert twins.twin("unet", {"padding": "valid"}, NUM_CLASSES) is None
  assert twins.twin("unet", {"dtype": "bfloat16"}, NUM_CLASSES) is None
  assert twins.twin("unet", {"remat": True}, NUM_CLASSES) is None
  assert twins.twin("unet", {"dtype": "float32", "remat": False, "features": 4},
                    NUM_CLASSES) is not None
  with pytest.raises(ValueError, match="num_classes"):
    twins.twin("unet", {}, 0)
  with pytest.raises(TypeError, match="kwargs"):
    twins.twin("unet", [("features", 4)], NUM_CLASSES)

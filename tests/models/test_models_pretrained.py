"""ImageNet-pretrained MobileNetV2 on real photos: jaxseg's loader and model vs torchvision.

torchvision's own ``mobilenet_v2-b0353104.pth`` (legacy torch.save format) is read with
``jaxseg.convert.load_torch_file`` (no torch), converted by ``from_torch_state_dict``
and run on two scikit-image photos. The reference is torchvision's MobileNetV2 loaded
from the same file with ``torch.load(weights_only=True)``. The file comes from the
library's fetch command; without it these tests skip.
"""
import jax
import numpy as np
import pytest

import jaxseg
from jaxseg.convert import from_torch_state_dict, load_torch_file, weights

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
skimage_data = pytest.importorskip("skimage.data")
skimage_transform = pytest.importorskip("skimage.transform")

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
TOL = 1e-4
# skimage.data photo -> ImageNet class: chelsea is a tabby cat (285 "Egyptian cat";
# 281/282 tabby/tiger cat are the runners-up), coffee a cup of espresso (967).
PHOTOS = {"chelsea": 285, "coffee": 967}


@pytest.fixture(scope="module")
def weights_file():
  try:
    return weights.path("mobilenet_v2")
  except FileNotFoundError:
    pytest.skip("ImageNet MobileNetV2 weights are not in the cache; fetch them with "
                f"`{weights.fetch_command('mobilenet_v2')}`")


def _preprocess(image: np.ndarray) -> np.ndarray:
  """uint8 [H,W,3] -> float32 [224,224,3] in [0,1]: shorter side 256 (bilinear), centre crop."""
  image = image.astype(np.float32) / 255.0
  h, w = image.shape[:2]
  scale = 256 / min(h, w)
  image = skimage_transform.resize(image, (round(h * scale), round(w * scale)), order=1,
                                   anti_aliasing=True)
  h, w = image.shape[:2]
  top, left = (h - 224) // 2, (w - 224) // 2
  return image[top:top + 224, left:left + 224].astype(np.float32)


@pytest.fixture(scope="module")
def photos():
  """[2,224,224,3] float32 RGB in [0,1], in PHOTOS order; both models see exactly these."""
  return np.stack([_preprocess(getattr(skimage_data, name)()) for name in PHOTOS])


@pytest.fixture(scope="module")
def jax_logits(weights_file, photos):
  model = jaxseg.models.build_backbone("mobilenet_v2", num_classes=1000)
  variables = from_torch_state_dict(model, load_torch_file(weights_file),
                                    sample_input_shape=(1, 224, 224, 3))
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False)["logits"])
  return np.asarray(apply(variables, photos))  # the model normalises internally


@pytest.fixture(scope="module")
def torch_logits(weights_file, photos):
  model = torchvision.models.mobilenet_v2(weights=None)
  model.load_state_dict(torch.load(weights_file, weights_only=True))
  model.eval()
  x = torch.from_numpy(np.ascontiguousarray(((photos - MEAN) / STD).transpose(0, 3, 1, 2)))
  with torch.no_grad():
    return model(x).numpy()


def test_loader_reads_the_file_like_torch(weights_file):
  ours = load_torch_file(weights_file)
  ref = torch.load(weights_file, weights_only=True)
  assert list(ours) == list(ref)
  for name, t in ref.items():
    assert ours[name].dtype == t.numpy().dtype, name
    np.testing.assert_array_equal(ours[name], t.numpy(), err_msg=name)


def test_photos_get_their_imagenet_class(jax_logits):
  assert jax_logits.shape == (len(PHOTOS), 1000)
  assert jax_logits.argmax(-1).tolist() == list(PHOTOS.values())


def test_logits_match_torchvision(jax_logits, torch_logits):
  # the reference itself must get the photos right, or the comparison says little
  assert torch_logits.argmax(-1).tolist() == list(PHOTOS.values())
  for i, name in enumerate(PHOTOS):
    top5_jax = np.argsort(-jax_logits[i])[:5]
    top5_torch = np.argsort(-torch_logits[i])[:5]
    assert set(top5_jax.tolist()) == set(top5_torch.tolist()), name
  rel = np.abs(jax_logits - torch_logits).max() / np.abs(torch_logits).max()
  assert rel <= TOL, rel

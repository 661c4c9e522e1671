"""The Cityscapes builder on a tiny folder written at test time in the official layout."""
import os
import sys

import numpy as np
import pytest
from PIL import Image

from jaxseg import data
from jaxseg.data import cityscapes, features, weak_labels

H, W = 32, 64
# (split folder, city, stem, with an instanceIds file)
FILES = (("train", "aachen", "aachen_000000_000019", True),
         ("train", "bochum", "bochum_000000_000313", False),
         ("val", "frankfurt", "frankfurt_000000_000294", True))
# The official table's 19 evaluated label ids, in train id order (cityscapesScripts labels.py).
EVALUATED_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
# The label ids the fixture uses -> the train id expected.
TRAIN_ID = {0: 255, 7: 0, 9: 255, 11: 2, 21: 8, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 29: 255,
            33: 18}


def _label_ids(stem):
  """labelIds and instanceIds maps of one fixture frame."""
  ids = np.full((H, W), 7, np.uint8)  # road
  ids[:10] = 23                       # sky
  ids[10:20, :32] = 11                # building
  ids[10:20, 32:] = 21                # vegetation
  ids[31] = 0                         # unlabeled -> 255
  inst = ids.astype(np.int32)
  if stem.startswith(("aachen", "bochum")):
    ids[22:28, 10:30] = 26            # two touching cars
    inst[22:28, 10:20] = 26000
    inst[22:28, 20:30] = 26001
    ids[14:28, 40:44] = 24            # a person
    inst[14:28, 40:44] = 24000
    ids[28:31, 50:64] = 9             # parking -> 255
    inst[28:31, 50:64] = 9
    if stem.startswith("bochum"):
      ids[2:8, 2:6] = 33              # a bicycle
      inst[2:8, 2:6] = 33000
  else:
    ids[20:30, 5:15] = 25             # a rider
    inst[20:30, 5:15] = 25000
    ids[20:30, 30:50] = 27            # a truck
    inst[20:30, 30:50] = 27000
    ids[20:30, 52:60] = 29            # a caravan -> 255
    inst[20:30, 52:60] = 29000
  return ids, inst


def write_cityscapes_fixture(root) -> dict:
  """Writes leftImg8bit/ and gtFine/ and returns {stem: (image, label ids, instance ids)}."""
  rng = np.random.default_rng(0)
  out = {}
  for folder, city, stem, with_instances in FILES:
    image_dir = os.path.join(root, "leftImg8bit", folder, city)
    label_dir = os.path.join(root, "gtFine", folder, city)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(label_dir, exist_ok=True)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(image).save(os.path.join(image_dir, f"{stem}_leftImg8bit.png"))
    ids, inst = _label_ids(stem)
    Image.fromarray(ids, mode="L").save(os.path.join(label_dir, f"{stem}_gtFine_labelIds.png"))
    if with_instances:  # 16-bit grey PNGs, as released
      Image.fromarray(inst.astype(np.uint16)).save(
          os.path.join(label_dir, f"{stem}_gtFine_instanceIds.png"))
    out[stem] = (image, ids, inst)
  return out


def _train_ids(ids):
  return np.vectorize(TRAIN_ID.get)(ids).astype(np.int32)


@pytest.fixture(scope="module")
def city(tmp_path_factory):
  root = tmp_path_factory.mktemp("cityscapes")
  expected = write_cityscapes_fixture(str(root / "cityscapes"))
  train = data.load("cityscapes", "train", data_dir=root / "tfds", manual_dir=root / "cityscapes")
  return root, expected, train


def test_label_table():
  assert len(cityscapes.LABEL_TO_TRAIN_ID) == 34 and len(cityscapes.CLASS_NAMES) == 19
  expected = np.full(34, 255)
  expected[list(EVALUATED_IDS)] = np.arange(19)
  np.testing.assert_array_equal(cityscapes.to_train_ids(np.arange(34, dtype=np.uint8)), expected)
  assert cityscapes.CLASS_NAMES[cityscapes.to_train_ids(np.array([26]))[0]] == "car"
  assert cityscapes.CLASS_NAMES[cityscapes.to_train_ids(np.array([7]))[0]] == "road"
  with pytest.raises(ValueError, match=r"label ids must lie in \[0, 33\]"):
    cityscapes.to_train_ids(np.array([[0, 255]], np.uint8))


def test_cityscapes_train_split(city):
  _, expected, train = city
  assert len(train) == 2 and train.class_names == cityscapes.CLASS_NAMES
  for i, stem in enumerate(("aachen_000000_000019", "bochum_000000_000313")):  # city order
    image, ids, _ = expected[stem]
    ex = train[i]
    np.testing.assert_array_equal(ex["image"], image)  # the PNG's own pixels
    np.testing.assert_array_equal(ex["mask"], _train_ids(ids))
    assert ex["mask"][31, 0] == 255 and ex["mask"][0, 0] == 10 and ex["mask"][25, 12] == 13
  # aachen has instanceIds: the touching cars stay two instances, boxes tight around them.
  ex = train[0]
  live = ex["box_classes"] >= 0
  assert sorted(ex["box_classes"][live].tolist()) == [11, 13, 13]
  boxes = {tuple(b) for b in ex["boxes"][live].tolist()}
  assert boxes == {(22, 10, 27, 19), (22, 20, 27, 29), (14, 40, 27, 43)}
  # bochum has none: connected components of the thing classes, so its cars merge.
  ex = train[1]
  live = ex["box_classes"] >= 0
  assert sorted(ex["box_classes"][live].tolist()) == [11, 13, 18]
  assert (22, 10, 27, 29) in {tuple(b) for b in ex["boxes"][live].tolist()}
  tight, _ = weak_labels.boxes_from_instances(ex["instance_masks"], ex["box_classes"])
  np.testing.assert_array_equal(ex["boxes"], tight)
  np.testing.assert_array_equal(np.flatnonzero(ex["tags"]), [0, 2, 8, 10, 11, 13, 18])
  on = ex["scribble"] != 255
  assert on.any() and np.all(ex["scribble"][on] == ex["mask"][on])
  assert "tensorflow" not in sys.modules


def test_cityscapes_validation_and_batches(city):
  root, expected, train = city
  val = data.load("cityscapes", "validation", data_dir=root / "tfds", manual_dir=root / "cityscapes")
  assert len(val) == 1
  ex = val[0]
  np.testing.assert_array_equal(ex["mask"], _train_ids(expected["frankfurt_000000_000294"][1]))
  assert set(np.unique(ex["mask"]).tolist()) == {0, 2, 8, 10, 12, 14, 255}  # caravan ignored
  live = ex["box_classes"] >= 0
  assert sorted(ex["box_classes"][live].tolist()) == [12, 14]
  batch = next(data.train_batches(train, batch_size=2, crop_size=(24, 32), seed=0))
  dtypes = {"image": np.float32, "valid": np.bool_, "mask": np.int32, "scribble": np.int32,
            "boxes": np.float32, "box_classes": np.int32, "tags": np.float32,
            "instance_masks": np.uint8}
  for key, dtype in dtypes.items():
    assert batch[key].dtype == dtype, key
  assert batch["mask"].shape == (2, 24, 32) and batch["tags"].shape == (2, 19)


def test_cityscapes_downscale(city):
  root, expected, _ = city
  small = data.load("cityscapes", "train", data_dir=root / "tfds", manual_dir=root / "cityscapes",
                    image_size=(16, 32))
  stem = "aachen_000000_000019"
  image, ids, _ = expected[stem]
  ex = small[0]
  np.testing.assert_array_equal(ex["image"], features.resize(image, (16, 32), nearest=False))
  np.testing.assert_array_equal(
      ex["mask"], features.resize(_train_ids(ids).astype(np.uint8), (16, 32), nearest=True))
  assert {"native", "16x32"} <= set(os.listdir(root / "tfds" / "jaxseg_cityscapes"))


def test_cityscapes_missing_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="(?s)folder not found.*leftImg8bit_trainvaltest.zip"
                     ".*gtFine_trainvaltest.zip.*login"):
    data.load("cityscapes", "train", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "nowhere")
  (tmp_path / "partial" / "leftImg8bit" / "train").mkdir(parents=True)
  (tmp_path / "partial" / "leftImg8bit" / "val").mkdir(parents=True)
  with pytest.raises(ValueError, match="missing gtFine/train, gtFine/val"):
    data.load("cityscapes", "train", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "partial")


def test_cityscapes_train_id_pngs_are_refused(tmp_path):
  root = tmp_path / "cityscapes"
  write_cityscapes_fixture(str(root))
  label = root / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png"
  Image.fromarray(np.full((H, W), 255, np.uint8), mode="L").save(label)  # a labelTrainIds file
  with pytest.raises(ValueError, match="label ids must lie"):
    data.load("cityscapes", "train", data_dir=tmp_path / "tfds", manual_dir=root)

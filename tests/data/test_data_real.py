"""CamVid and ISBI 2012 builders on small copies of the shared data (skip when it is absent)."""
import os
import shutil
import sys

import numpy as np
import pytest

from jaxseg import data
from jaxseg.data import camvid, features, weak_labels


def _small_camvid(camvid_dir, root, n_train=3, n_val=2):
  """A SegNet-layout copy of a few CamVid files (train + val only, like the shared copy)."""
  for images, labels, n in (("train", "trainannot", n_train), ("val", "valannot", n_val)):
    os.makedirs(root / images)
    os.makedirs(root / labels)
    for name in sorted(os.listdir(camvid_dir / images))[:n]:
      shutil.copy(camvid_dir / images / name, root / images / name)
      shutil.copy(camvid_dir / labels / name, root / labels / name)
  return root


def _small_isbi(isbi_dir, root, n=6):
  os.makedirs(root / "image")
  os.makedirs(root / "label")
  names = sorted(os.listdir(isbi_dir / "image"), key=lambda s: int(s.split(".")[0]))[:n]
  for name in names:
    shutil.copy(isbi_dir / "image" / name, root / "image" / name)
    shutil.copy(isbi_dir / "label" / name, root / "label" / name)
  return names


def test_camvid_builder(camvid_dir, tmp_path):
  manual = _small_camvid(camvid_dir, tmp_path / "camvid")
  train = data.load("camvid", "train", data_dir=tmp_path / "tfds", manual_dir=manual,
                    image_size=(48, 64))
  assert len(train) == 3 and train.num_classes == 11 and train.class_names[0] == "Sky"
  assert train.class_names == camvid.CLASS_NAMES
  validation = data.load("camvid", "validation", data_dir=tmp_path / "tfds", manual_dir=manual,
                         image_size=(48, 64))
  assert len(validation) == 2
  with pytest.raises(ValueError, match="no split 'test'"):
    data.load("camvid", "test", data_dir=tmp_path / "tfds", manual_dir=manual, image_size=(48, 64))
  name = sorted(os.listdir(manual / "train"))[0]
  ex = train[0]
  assert ex["image"].shape == (48, 64, 3) and ex["mask"].dtype == np.int32
  raw = features.resize(features.read_png(str(manual / "trainannot" / name)), (48, 64), nearest=True)
  np.testing.assert_array_equal(ex["mask"], np.where(raw == 11, 255, raw))
  image = features.resize(features.read_png(str(manual / "train" / name)), (48, 64), nearest=False)
  np.testing.assert_array_equal(ex["image"], image)
  # Weak labels agree with the mask.
  np.testing.assert_array_equal(ex["tags"], weak_labels.tags_from_mask(ex["mask"], 11))
  on = ex["scribble"] != 255
  assert on.any() and np.all(ex["scribble"][on] == ex["mask"][on])
  live = ex["box_classes"] >= 0
  assert set(ex["box_classes"][live].tolist()) <= set(camvid.THING_CLASSES)
  tight, _ = weak_labels.boxes_from_instances(ex["instance_masks"], ex["box_classes"])
  np.testing.assert_array_equal(ex["boxes"], tight)
  # Another size prepares into its own config instead of colliding with the first.
  other = data.load("camvid", "train", data_dir=tmp_path / "tfds", manual_dir=manual, image_size=(24, 32))
  assert other[0]["image"].shape == (24, 32, 3)
  assert train[0]["image"].shape == (48, 64, 3)
  assert {"24x32", "48x64"} <= set(os.listdir(tmp_path / "tfds" / "jaxseg_camvid"))
  # Once prepared, the manual folder is no longer needed.
  again = data.load("camvid", "train", data_dir=tmp_path / "tfds", image_size=(48, 64))
  np.testing.assert_array_equal(again[1]["mask"], train[1]["mask"])
  batch = next(data.train_batches(train, batch_size=2, crop_size=(32, 32)))
  assert batch["tags"].shape == (2, 11)
  assert "tensorflow" not in sys.modules


def test_camvid_missing_data(tmp_path):
  with pytest.raises(ValueError, match="no manual_dir given"):
    data.load("camvid", "train", data_dir=tmp_path / "tfds", image_size=(16, 16))
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
    data.load("camvid", "train", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no image/label folder pair.*empty"):
    data.load("camvid", "train", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "empty")
  with pytest.raises(ValueError, match="image_size"):
    camvid.make_config((0, 5))


def test_camvid_rejects_bad_labels(tmp_path):
  from PIL import Image
  img = tmp_path / "i.png"
  lab = tmp_path / "l.png"
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
  Image.fromarray(np.full((8, 8), 12, np.uint8)).save(lab)
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 11\], found 12"):
    camvid.read_example(str(img), str(lab))


def test_isbi_builder(isbi_dir, tmp_path):
  names = _small_isbi(isbi_dir, tmp_path / "isbi")
  kwargs = dict(data_dir=tmp_path / "tfds", manual_dir=tmp_path / "isbi", num_validation=2,
                image_size=(64, 64))
  train = data.load("isbi2012", "train", **kwargs)
  validation = data.load("isbi2012", "validation", **kwargs)
  assert (len(train), len(validation)) == (4, 2)
  assert train.class_names == ("membrane", "cell")
  # The last slices (by number) are held out, in order.
  label = features.read_png(str(tmp_path / "isbi" / "label" / names[-1]), "L")
  label = features.resize(label, (64, 64), nearest=True)
  np.testing.assert_array_equal(validation[1]["mask"], (label == 255).astype(np.int32))
  # Cells (white, 255) are the majority class, membranes (black, 0) the minority.
  mask = validation[1]["mask"]
  assert 0.5 < mask.mean() < 0.95
  ex = train[0]
  assert ex["image"].shape == (64, 64, 3)
  np.testing.assert_array_equal(ex["image"][..., 0], ex["image"][..., 2])
  assert np.all(ex["box_classes"][ex["box_classes"] >= 0] == 1)
  on = ex["scribble"] != 255
  assert on.any() and np.all(ex["scribble"][on] == ex["mask"][on])
  cover = weak_labels.scribble_coverage([train[i]["scribble"] for i in range(len(train))])
  assert 0.005 < cover < 0.08
  with pytest.raises(ValueError, match="leaves no training slices"):
    data.load("isbi2012", "train", data_dir=tmp_path / "tfds2", manual_dir=tmp_path / "isbi",
              num_validation=6, image_size=(64, 64))


def test_isbi_missing_files(tmp_path):
  (tmp_path / "isbi" / "image").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "isbi" / "label")):
    data.load("isbi2012", "train", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "isbi")
  (tmp_path / "isbi" / "label").mkdir()
  from PIL import Image
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "isbi" / "image" / "0.png")
  with pytest.raises(ValueError, match=r"label file not found: .*label/0.png"):
    data.load("isbi2012", "train", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "isbi")

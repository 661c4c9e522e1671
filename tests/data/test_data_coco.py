"""The COCO-format builder on ``fixtures/coco_tiny`` (see make_coco_tiny.py for what it holds).

Expected masks and boxes are written by hand from the fixture's description; polygons are also
checked against pycocotools' own ``COCO.annToMask``.
"""
import contextlib
import io
import json
import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from jaxseg import data
from jaxseg.data import coco, features

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "coco_tiny")
H, W = 40, 56
# Contiguous class ids of the fixture's categories 1 person, 3 car, 7 train.
PERSON, CAR, TRAIN = 1, 2, 3


def rect(r0, c0, r1, c1, shape=(H, W)):
  m = np.zeros(shape, np.uint8)
  m[r0:r1 + 1, c0:c1 + 1] = 1
  return m


def gt_coco(split="train2017"):
  with contextlib.redirect_stdout(io.StringIO()):
    return COCO(os.path.join(FIXTURE, "annotations", f"instances_{split}.json"))


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def train(tfds_dir):
  return data.load("coco", "train", data_dir=tfds_dir, manual_dir=FIXTURE)


def test_fixture_is_small_and_in_coco_format():
  total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(FIXTURE) for f in fs)
  assert total < 50_000
  with open(os.path.join(FIXTURE, "annotations", "instances_train2017.json")) as f:
    dataset = json.load(f)
  assert set(dataset) == {"info", "licenses", "images", "annotations", "categories"}
  kinds = {type(a["segmentation"]).__name__ + ("_str" if isinstance(a["segmentation"], dict)
                                               and isinstance(a["segmentation"]["counts"], str)
                                               else "") for a in dataset["annotations"]}
  assert kinds == {"list", "dict", "dict_str"}  # polygons, uncompressed and compressed RLE
  assert any(len(a["segmentation"]) == 2 for a in dataset["annotations"]
             if isinstance(a["segmentation"], list))  # a two-part polygon
  assert [c["id"] for c in dataset["categories"]] == [7, 1, 3]


def test_label_space():
  cats = [{"id": 7, "name": "train"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
  space = coco.label_space(cats)
  assert space.class_names == ("background", "person", "car", "train")
  assert space.category_ids == (0, 1, 3, 7)
  assert dict(space.lookup) == {1: 1, 3: 2, 7: 3}
  raw = coco.label_space(cats, contiguous_ids=False)
  assert raw.class_names == ("background", "person", "N/A", "car", "N/A", "N/A", "N/A", "train")
  assert raw.category_ids == (0, 1, 0, 3, 0, 0, 0, 7)
  assert dict(raw.lookup) == {1: 1, 3: 3, 7: 7}
  with pytest.raises(ValueError, match="appears twice"):
    coco.label_space(cats + [{"id": 3, "name": "bus"}])
  with pytest.raises(ValueError, match="integers >= 1"):
    coco.label_space([{"id": 0, "name": "x"}])


def test_inclusive_box_rounding():
  # Whole-pixel boxes: y1 = y + h - 1.
  assert coco.inclusive_box([0, 0, 20, 20], H, W) == (0, 0, 19, 19)
  assert coco.inclusive_box([36, 16, 15, 20], H, W) == (16, 36, 35, 50)
  # Edges round to the nearest pixel boundary: 4.3 -> 4, 4.3 + 15.4 = 19.7 -> 20 -> last col 19.
  assert coco.inclusive_box([4.3, 6.3, 15.4, 23.4], H, W) == (6, 4, 29, 19)
  assert coco.inclusive_box([4.5, 6.5, 1.0, 1.0], H, W) == (7, 5, 7, 5)  # halves round up
  assert coco.inclusive_box([2.5, 2.5, 0.2, 0.2], H, W) == (3, 3, 3, 3)  # at least one pixel
  # Clipped to the image; no area left -> dropped.
  assert coco.inclusive_box([40, 30, 20, 15], H, W) == (30, 40, 39, 55)
  assert coco.inclusive_box([-5, -5, 3, 3], H, W) is None
  assert coco.inclusive_box([10, 10, 0, 5], H, W) is None
  # Scaled edges (resizing at preparation): rows [16, 36) at 1/2 are [8, 18).
  assert coco.inclusive_box([36, 16, 15, 20], H // 2, W // 2, scale=(0.5, 0.5)) == (8, 18, 17, 25)


def test_train_split_hand_computed(train):
  assert len(train) == 3 and train.class_names == ("background", "person", "car", "train")
  meta = train.builder.info.metadata
  assert meta["image_ids"] == {"train": [7, 42, 99], "validation": [5]}
  assert meta["category_ids"] == [0, 1, 3, 7] and meta["thing_classes"] == [1, 2, 3]

  # Image 42: person polygon rows 6..29 cols 4..19 (corners off-grid), a two-part car,
  # a train (compressed RLE) over the car's second part, a person crowd under the person.
  ex = train[1]
  with Image.open(os.path.join(FIXTURE, "train2017", "000000000042.jpg")) as im:
    np.testing.assert_array_equal(ex["image"], np.asarray(im.convert("RGB")))
  live = ex["box_classes"] >= 0
  assert live.sum() == 3 and ex["box_classes"].shape == (coco.MAX_INSTANCES,)
  np.testing.assert_array_equal(ex["box_classes"][:3], [PERSON, CAR, TRAIN])
  np.testing.assert_array_equal(ex["boxes"][:3], [[6, 4, 29, 19], [4, 30, 19, 51],
                                                  [16, 36, 35, 50]])
  person, train_mask = rect(6, 4, 29, 19), rect(16, 36, 35, 50)
  car = rect(4, 30, 11, 39) | rect(8, 44, 19, 51)
  np.testing.assert_array_equal(ex["instance_masks"][0], person)
  np.testing.assert_array_equal(ex["instance_masks"][1], car)
  np.testing.assert_array_equal(ex["instance_masks"][2], train_mask)
  assert not ex["instance_masks"][3:].any() and not ex["boxes"][3:].any()
  assert (ex["box_classes"][3:] == -1).all()
  semantic = np.zeros((H, W), np.int32)
  semantic[rect(26, 2, 37, 13) == 1] = 255   # crowd: ignore ...
  semantic[person == 1] = PERSON             # ... where no instance covers it
  semantic[car == 1] = CAR
  semantic[train_mask == 1] = TRAIN          # later annotation over the car
  np.testing.assert_array_equal(ex["mask"], semantic)
  np.testing.assert_array_equal(ex["tags"], [1, 1, 1, 1])

  # Image 7: grey JPEG -> RGB; triangle person, car partly under a train (uncompressed RLE).
  ex = train[0]
  with Image.open(os.path.join(FIXTURE, "train2017", "000000000007.jpg")) as im:
    assert im.mode == "L"
    grey = np.asarray(im)
  np.testing.assert_array_equal(ex["image"], np.repeat(grey[..., None], 3, axis=-1))
  np.testing.assert_array_equal(ex["box_classes"][:4], [PERSON, CAR, TRAIN, -1])
  np.testing.assert_array_equal(ex["boxes"][:3], [[0, 0, 19, 19], [10, 30, 29, 49],
                                                  [20, 40, 35, 53]])
  assert ex["mask"][25, 35] == CAR and ex["mask"][25, 45] == TRAIN and ex["mask"][0, 0] == PERSON
  assert 255 not in ex["mask"]

  # Image 99: no annotation, kept as all background.
  ex = train[2]
  assert not ex["mask"].any() and (ex["box_classes"] == -1).all()
  np.testing.assert_array_equal(ex["tags"], [1, 0, 0, 0])
  assert "tensorflow" not in sys.modules


def test_masks_equal_pycocotools_ann_to_mask(train):
  gt = gt_coco()
  index = {7: 0, 42: 1}
  for image_id, k in index.items():
    ex = train[k]
    anns = gt.loadAnns(gt.getAnnIds(imgIds=[image_id]))
    things = [a for a in anns if not a["iscrowd"]]
    for j, ann in enumerate(things):
      np.testing.assert_array_equal(ex["instance_masks"][j], gt.annToMask(ann), str(ann["id"]))
    for ann in anns:
      if ann["iscrowd"]:
        covered = np.any([gt.annToMask(a) for a in things], axis=0)
        np.testing.assert_array_equal(ex["mask"] == 255, (gt.annToMask(ann) == 1) & ~covered)


def test_validation_split_clips_to_the_image(tfds_dir, train):
  val = data.load("coco", "validation", data_dir=tfds_dir, manual_dir=FIXTURE)
  assert len(val) == 1
  ex = val[0]
  np.testing.assert_array_equal(ex["boxes"][0], [30, 40, 39, 55])
  np.testing.assert_array_equal(ex["instance_masks"][0], rect(30, 40, 39, 55))
  assert ex["box_classes"][0] == TRAIN and (ex["box_classes"][1:] == -1).all()
  np.testing.assert_array_equal(ex["tags"], [1, 0, 0, 1])


def test_raw_category_ids(tfds_dir):
  raw = data.load("coco", "train", data_dir=tfds_dir, manual_dir=FIXTURE, contiguous_ids=False)
  assert raw.num_classes == 8 and raw.class_names[3] == "car" and raw.class_names[2] == "N/A"
  ex = raw[1]
  np.testing.assert_array_equal(ex["box_classes"][:4], [1, 3, 7, -1])
  assert ex["mask"][30, 40] == 7 and ex["tags"].shape == (8,)
  np.testing.assert_array_equal(np.flatnonzero(ex["tags"]), [0, 1, 3, 7])


def test_max_instances_and_image_size(tfds_dir):
  small = data.load("coco", "train", data_dir=tfds_dir, manual_dir=FIXTURE, max_instances=2,
                    image_size=(20, 28))
  ex = small[1]  # image 42: person (384 px), car (176), train (300): the car is dropped
  assert ex["box_classes"].shape == (2,) and ex["instance_masks"].shape == (2, 20, 28)
  np.testing.assert_array_equal(ex["box_classes"], [PERSON, TRAIN])
  # Edges halved: person rows [6, 30) -> [3, 15), cols [4, 20) -> [2, 10).
  np.testing.assert_array_equal(ex["boxes"], [[3, 2, 14, 9], [8, 18, 17, 25]])
  np.testing.assert_array_equal(ex["instance_masks"][0],
                                features.resize(rect(6, 4, 29, 19), (20, 28), nearest=True))
  with Image.open(os.path.join(FIXTURE, "train2017", "000000000042.jpg")) as im:
    full = np.asarray(im.convert("RGB"))
  np.testing.assert_array_equal(ex["image"], features.resize(full, (20, 28), nearest=False))
  assert ex["mask"].shape == (20, 28) and CAR in ex["mask"]  # the semantic mask keeps it
  names = os.listdir(os.path.join(tfds_dir, "jaxseg_coco"))
  assert any(n.startswith("20x28_m2_contiguous_") for n in names)
  assert any(n.startswith("native_m100_contiguous_") for n in names)


def test_own_export_split_and_prepared_copy(tmp_path):
  root = tmp_path / "export"
  shutil.copytree(FIXTURE, root)
  os.rename(root / "val2017", root / "my_set")
  os.rename(root / "annotations" / "instances_val2017.json",
            root / "annotations" / "instances_my_set.json")
  shutil.rmtree(root / "train2017")  # its json stays: skipped, no image folder
  mine = data.load("coco", "my_set", data_dir=tmp_path / "tfds", manual_dir=root)
  assert len(mine) == 1 and list(mine.builder.info.splits.keys()) == ["my_set"]
  # Without the folder, the prepared copy of this setting is used.
  shutil.rmtree(root)
  again = data.load("coco", "my_set", data_dir=tmp_path / "tfds", manual_dir=root)
  np.testing.assert_array_equal(again[0]["mask"], mine[0]["mask"])
  assert again.class_names == mine.class_names


def test_batches_have_static_shapes(train):
  batches = data.train_batches(train, batch_size=2, crop_size=(32, 48), seed=0)
  for _ in range(2):
    batch = next(batches)
    assert batch["boxes"].shape == (2, coco.MAX_INSTANCES, 4)
    assert batch["box_classes"].shape == (2, coco.MAX_INSTANCES)
    assert batch["instance_masks"].shape == (2, coco.MAX_INSTANCES, 32, 48)
    assert batch["boxes"].dtype == np.float32 and batch["box_classes"].dtype == np.int32
    assert batch["instance_masks"].dtype == np.uint8 and batch["mask"].shape == (2, 32, 48)
    assert "scribble" not in batch
  batch = next(data.eval_batches(train, batch_size=2))
  assert batch["instance_masks"].shape == (2, coco.MAX_INSTANCES, H, W)
  np.testing.assert_array_equal(batch["index"], [0, 1])


def test_missing_folder_says_where_files_go(tmp_path):
  with pytest.raises(FileNotFoundError, match="(?s)folder not found.*annotations_trainval2017.zip"
                     ".*instances_val2017.json.*val2017/"):
    data.load("coco", "train", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "nowhere")
  (tmp_path / "empty" / "annotations").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match=r"no annotations/instances_<name>\.json"):
    data.load("coco", "train", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "empty")
  shutil.copy(os.path.join(FIXTURE, "annotations", "instances_val2017.json"),
              tmp_path / "empty" / "annotations")
  with pytest.raises(ValueError, match="without their image folder: instances_val2017.json"):
    data.load("coco", "validation", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "empty")


def test_bad_settings(tmp_path):
  with pytest.raises(ValueError, match="max_instances"):
    data.load("coco", "train", data_dir=tmp_path, manual_dir=FIXTURE, max_instances=0)
  with pytest.raises(TypeError, match="contiguous_ids"):
    data.load("coco", "train", data_dir=tmp_path, manual_dir=FIXTURE, contiguous_ids="yes")
  with pytest.raises(ValueError, match="RLE of size"):
    coco.annotation_rle({"size": [10, 10], "counts": [100]}, H, W)

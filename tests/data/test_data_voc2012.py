"""The PASCAL VOC 2012 builder on a tiny folder written at test time in VOC's exact layout."""
import os
import sys

import numpy as np
import pytest
from PIL import Image

from jaxseg import data
from jaxseg.data import features, scribblesup, voc2012

TRAIN_IDS = ("2007_000032", "2007_000039")
VAL_IDS = ("2008_000003",)
AUG_ONLY_IDS = ("2008_000010",)  # in SBD's train_aug, not in VOC's segmentation lists
SHAPES = {"2007_000032": (32, 48), "2007_000039": (40, 36), "2008_000003": (32, 48),
          "2008_000010": (32, 48)}
# The ScribbleSup scribbles of 2007_000032: (class, [(x, y), ...]).
SCRIBBLES = [(0, [(1, 1), (40, 1), (40, 3)]), (1, [(8, 10), (26, 14)]), (15, [(38, 25)])]


def voc_palette() -> list[int]:
  """VOC's colour map (bit-reversed class index), as the devkit's VOClabelcolormap.m makes it."""
  palette = []
  for i in range(256):
    r = g = b = 0
    c = i
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    palette += [r, g, b]
  return palette


def _palette_png(path, label):
  image = Image.fromarray(label.astype(np.uint8), mode="P")
  image.putpalette(voc_palette())
  image.save(path)


def _object(mask, instances, k, cls, y0, x0, y1, x1):
  """Fills object k of class cls on rows y0..y1, cols x0..x1 with a 1-pixel void ring."""
  mask[y0 - 1:y1 + 2, x0 - 1:x1 + 2] = 255
  instances[y0 - 1:y1 + 2, x0 - 1:x1 + 2] = 255
  mask[y0:y1 + 1, x0:x1 + 1] = cls
  instances[y0:y1 + 1, x0:x1 + 1] = k


def _xml(path, size, objects):
  """A VOC annotation: objects are (name, xmin, ymin, xmax, ymax (1-based), difficult)."""
  h, w = size
  rows = [f"<annotation><folder>VOC2012</folder><filename>{os.path.basename(path)[:-4]}.jpg"
          f"</filename><size><width>{w}</width><height>{h}</height><depth>3</depth></size>"
          "<segmented>1</segmented>"]
  for name, x0, y0, x1, y1, difficult in objects:
    rows.append(f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
                f"<difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
                f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>"
                "<part><name>head</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax>"
                "<ymax>2</ymax></bndbox></part></object>")
  rows.append("</annotation>")
  with open(path, "w") as f:
    f.write("\n".join(rows))


def write_voc_fixture(root, *, aug=True, scribbles=True) -> dict:
  """Writes a VOC2012 folder (JPEGs, palette masks, objects, XML, lists, optionally SBD's
  SegmentationClassAug and ScribbleSup's pascal_2012) and returns the expected labels by id:
  ``{id: (mask, [(class, box (y0, x0, y1, x1)), ...], instance map)}``."""
  for sub in ("JPEGImages", "SegmentationClass", "SegmentationObject", "Annotations",
              "ImageSets/Segmentation"):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
  rng = np.random.default_rng(0)
  expected = {}
  ids = TRAIN_IDS + VAL_IDS + AUG_ONLY_IDS
  for image_id in ids:
    h, w = SHAPES[image_id]
    mask = np.zeros((h, w), np.uint8)
    inst = np.zeros((h, w), np.uint8)
    if image_id == "2007_000032":  # an aeroplane and a difficult person
      _object(mask, inst, 1, 1, 4, 6, 19, 29)
      _object(mask, inst, 2, 15, 20, 34, 29, 43)
      objects = [("aeroplane", 7, 5, 30, 20, 0), ("person", 35, 21, 44, 30, 1)]
    elif image_id == "2007_000039":  # a dog and a cat, numbered against the XML order
      _object(mask, inst, 2, 12, 3, 3, 12, 30)
      _object(mask, inst, 1, 8, 20, 5, 35, 15)
      objects = [(" Dog ", 4, 4, 31, 13, 0), ("cat", 6, 21, 16, 36, 0)]
    elif image_id == "2008_000003":  # a bird
      _object(mask, inst, 1, 3, 10, 10, 20, 20)
      objects = [("bird", 11, 11, 21, 21, 0)]
    else:  # SBD only: a sofa, no SegmentationObject, box larger than the sofa pixels
      mask[8:20, 10:40] = 18
      objects = [("sofa", 9, 7, 42, 22, 0)]
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(image).save(os.path.join(root, "JPEGImages", f"{image_id}.jpg"), quality=95)
    if image_id not in AUG_ONLY_IDS:
      _palette_png(os.path.join(root, "SegmentationClass", f"{image_id}.png"), mask)
      _palette_png(os.path.join(root, "SegmentationObject", f"{image_id}.png"), inst)
    _xml(os.path.join(root, "Annotations", f"{image_id}.xml"), (h, w), objects)
    if aug:  # SBD's masks as DeepLab distributes them: grey PNGs, for train_aug and val
      os.makedirs(os.path.join(root, "SegmentationClassAug"), exist_ok=True)
      Image.fromarray(mask, mode="L").save(os.path.join(root, "SegmentationClassAug", f"{image_id}.png"))
    boxes = [(voc2012.CLASS_NAMES.index(n.strip().lower()), (y0 - 1, x0 - 1, y1 - 1, x1 - 1))
             for n, x0, y0, x1, y1, _ in objects]
    expected[image_id] = (mask, boxes, inst if image_id not in AUG_ONLY_IDS else None)
  lists = os.path.join(root, "ImageSets", "Segmentation")
  with open(os.path.join(lists, "train.txt"), "w") as f:
    f.write("\n".join(TRAIN_IDS) + "\n")
  with open(os.path.join(lists, "val.txt"), "w") as f:
    f.write("\n".join(VAL_IDS) + "\n")
  if scribbles:
    os.makedirs(os.path.join(root, "pascal_2012"))
    scribblesup.write_scribblesup_xml(os.path.join(root, "pascal_2012", "2007_000032.xml"),
                                      32, 48, SCRIBBLES, voc2012.CLASS_NAMES)
  return expected


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
  """(folder holding VOCdevkit/VOC2012, expected labels, TFDS data dir, train Source)."""
  top = tmp_path_factory.mktemp("voc")
  expected = write_voc_fixture(str(top / "VOCdevkit" / "VOC2012"))
  tfds_dir = top / "tfds"
  train = data.load("voc2012", "train", data_dir=tfds_dir, manual_dir=top)
  return top, expected, tfds_dir, train


def test_read_voc_xml_by_hand(tmp_path):
  path = str(tmp_path / "a.xml")
  _xml(path, (20, 30), [("cow", 3, 2, 12, 9, 0), ("tvmonitor", 25, 15, 31, 21, 1)])
  objects = voc2012.read_voc_xml(path, 20, 30)
  # xmin 3, ymin 2, xmax 12, ymax 9 (1-based inclusive) -> y0 1, x0 2, y1 8, x1 11.
  assert objects[0] == voc2012.VocObject(10, (1, 2, 8, 11), False)
  # xmax 31 > width 30 and ymax 21 > height 20 are clipped to the last pixel; the part is no object.
  assert objects[1] == voc2012.VocObject(20, (14, 24, 19, 29), True)
  assert len(objects) == 2
  _xml(path, (20, 30), [("unicorn", 1, 1, 2, 2, 0)])
  with pytest.raises(ValueError, match="unknown class 'unicorn'"):
    voc2012.read_voc_xml(path)


def test_voc_train_split(voc):
  _, expected, _, train = voc
  assert len(train) == 2 and train.num_classes == 21
  assert train.class_names == voc2012.CLASS_NAMES and train.class_names[20] == "tvmonitor"
  for i, image_id in enumerate(TRAIN_IDS):  # ImageSets order
    ex = train[i]
    mask, boxes, _ = expected[image_id]
    assert ex["image"].shape == SHAPES[image_id] + (3,) and ex["image"].dtype == np.uint8
    np.testing.assert_array_equal(ex["mask"], mask)
    assert (ex["mask"] == 255).any() and ex["mask"].dtype == np.int32
  ex = train[0]
  # Boxes: the XML's 1-based inclusive boxes, 0-based; the difficult person is kept.
  np.testing.assert_array_equal(ex["boxes"][:2], [[4, 6, 19, 29], [20, 34, 29, 43]])
  np.testing.assert_array_equal(ex["box_classes"], [1, 15] + [-1] * 6)
  assert ex["boxes"].shape == (8, 4) and ex["boxes"].dtype == np.float32
  inst = expected["2007_000032"][2]
  np.testing.assert_array_equal(ex["instance_masks"][0], inst == 1)
  np.testing.assert_array_equal(ex["instance_masks"][1], inst == 2)
  assert not ex["instance_masks"][2:].any()
  np.testing.assert_array_equal(np.flatnonzero(ex["tags"]), [0, 1, 15])
  # ScribbleSup's scribbles drawn 3 pixels wide, as rloss does.
  np.testing.assert_array_equal(ex["scribble"], scribblesup.rasterize_scribbles(32, 48, SCRIBBLES,
                                                                                width_px=3))
  # 2007_000039 numbers its regions against the XML order: they are paired by class and IoU.
  ex = train[1]
  np.testing.assert_array_equal(ex["box_classes"][:2], [12, 8])
  inst = expected["2007_000039"][2]
  np.testing.assert_array_equal(ex["instance_masks"][0], inst == 2)
  np.testing.assert_array_equal(ex["instance_masks"][1], inst == 1)
  assert np.all(ex["scribble"] == 255)  # no ScribbleSup file for this image
  assert "tensorflow" not in sys.modules


def test_voc_image_is_the_jpeg(voc):
  top, _, _, train = voc
  jpeg = features.read_png(str(top / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{TRAIN_IDS[1]}.jpg"),
                           "RGB")
  np.testing.assert_array_equal(train[1]["image"], jpeg)


def test_voc_validation_and_train_aug(voc):
  top, expected, tfds_dir, _ = voc
  val = data.load("voc2012", "validation", data_dir=tfds_dir, manual_dir=top)
  assert len(val) == 1
  np.testing.assert_array_equal(val[0]["mask"], expected[VAL_IDS[0]][0])
  # train_aug derived from the SegmentationClassAug files minus val.txt, in id order.
  aug = data.load("voc2012", "train_aug", data_dir=tfds_dir, manual_dir=top)
  assert len(aug) == 3
  ex = aug[2]  # 2008_000010: SBD only
  mask = expected["2008_000010"][0]
  np.testing.assert_array_equal(ex["mask"], mask)
  np.testing.assert_array_equal(ex["boxes"][0], [6, 8, 21, 41])
  # No SegmentationObject: the instance is the sofa's pixels inside the box.
  np.testing.assert_array_equal(ex["instance_masks"][0], mask == 18)
  assert ex["box_classes"][0] == 18 and np.all(ex["box_classes"][1:] == -1)
  # Once prepared, the folder is no longer needed.
  again = data.load("voc2012", "validation", data_dir=tfds_dir, manual_dir=top / "gone")
  np.testing.assert_array_equal(again[0]["mask"], val[0]["mask"])


def test_voc_train_aug_list_and_options(tmp_path):
  root = str(tmp_path / "VOC2012")
  expected = write_voc_fixture(root, scribbles=False)
  with open(os.path.join(root, "ImageSets", "Segmentation", "train_aug.txt"), "w") as f:
    # DeepLab's list format; the val image listed by mistake is dropped.
    for image_id in ("2008_000010", "2008_000003", "2007_000032"):
      f.write(f"/JPEGImages/{image_id}.jpg /SegmentationClassAug/{image_id}.png\n")
  aug = data.load("voc2012", "train_aug", data_dir=tmp_path / "tfds", manual_dir=root,
                  include_difficult=False, scribble_width=1)
  assert len(aug) == 2
  np.testing.assert_array_equal(aug[1]["mask"], expected["2007_000032"][0])
  np.testing.assert_array_equal(aug[1]["box_classes"], [1] + [-1] * 7)  # difficult person dropped
  # Without ScribbleSup the scribbles are synthesised from the mask, 1 pixel wide.
  on = aug[1]["scribble"] != 255
  assert on.any() and np.all(aug[1]["scribble"][on] == aug[1]["mask"][on])
  assert sorted(n for n in os.listdir(tmp_path / "tfds" / "jaxseg_voc2012") if n[0] != ".") == [
      "w1_m8_nodiff_aug_boxes_objects"]


def test_voc_large_tags(voc):
  ex = voc[3][0]
  # Background and the aeroplane (16 x 24 of 32 x 48 pixels: 25%) are large; the person
  # (10 x 10: 6.5%) is not.
  np.testing.assert_array_equal(np.flatnonzero(ex["tags_large"]), [0, 1])
  assert ex["tags_large"].dtype == np.float32 and ex["tags_large"].shape == (21,)


def test_voc_missing_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="(?s)folder not found.*VOCtrainval_11-May-2012.tar"
                     ".*SegmentationClassAug.*pascal_2012"):
    data.load("voc2012", "train", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "nowhere")
  (tmp_path / "partial" / "JPEGImages").mkdir(parents=True)
  with pytest.raises(ValueError, match="missing SegmentationClass"):
    data.load("voc2012", "train", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "partial")


def test_voc_colour_masks_are_refused(tmp_path):
  path = str(tmp_path / "rgb.png")
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)
  with pytest.raises(ValueError, match="palette or grey PNG"):
    voc2012.read_label_png(path)


def test_voc_train_batches(voc):
  train = voc[3]
  batch = next(data.train_batches(train, batch_size=2, crop_size=(32, 32), seed=0))
  dtypes = {"image": np.float32, "valid": np.bool_, "mask": np.int32, "scribble": np.int32,
            "boxes": np.float32, "box_classes": np.int32, "tags": np.float32,
            "instance_masks": np.uint8}
  for key, dtype in dtypes.items():
    assert batch[key].dtype == dtype, key
  assert batch["image"].shape == (2, 32, 32, 3) and batch["tags"].shape == (2, 21)
  assert batch["boxes"].shape == (2, 8, 4) and batch["instance_masks"].shape == (2, 8, 32, 32)
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0

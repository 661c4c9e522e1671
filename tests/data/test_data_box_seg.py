"""The "box_seg" label kind: WSSL Bbox-Seg labels computed once per example and augmented like
the mask."""
import numpy as np
import pytest

from jaxseg import data
from jaxseg.constants import IGNORE_INDEX
from jaxseg.data import shapes, weak_labels

KINDS = ("boxes", "box_classes", "box_seg")


def test_train_batches_emit_box_seg_computed_once_per_example(tiny_shapes):
  train, _ = tiny_shapes
  batches = data.train_batches(train, batch_size=2, crop_size=(40, 48), seed=3, label_kinds=KINDS,
                               num_threads=1)
  batch = next(batches)
  assert set(batch) == {"image", "valid", "boxes", "box_classes", "box_seg"}
  assert batch["box_seg"].dtype == np.int32 and batch["box_seg"].shape == (2, 40, 48)
  np.testing.assert_array_equal(batch["box_seg"] == IGNORE_INDEX, ~batch["valid"])
  assert set(np.unique(batch["box_seg"])) <= set(range(shapes.NUM_CLASSES)) | {IGNORE_INDEX}
  cached = dict(train._box_seg)
  assert len(cached) >= 2
  index, _ = next(iter(cached))
  assert train.box_seg(index) is not cached[(index, ())]  # a copy, as int32
  np.testing.assert_array_equal(train.box_seg(index), cached[(index, ())])
  assert len(train._box_seg) == len(cached)  # served from the cache


def test_box_seg_is_close_to_the_mask_and_background_outside_the_boxes(tiny_shapes):
  _, validation = tiny_shapes
  batch = next(data.eval_batches(validation, batch_size=4, label_kinds=("mask",) + KINDS,
                                 num_threads=1))
  for i, index in enumerate(batch["index"]):
    np.testing.assert_array_equal(batch["box_seg"][i], validation.box_seg(index))
    in_box = np.zeros((64, 64), bool)
    for (y0, x0, y1, x1), k in zip(batch["boxes"][i].astype(int), batch["box_classes"][i]):
      if k >= 0:
        in_box[y0:y1 + 1, x0:x1 + 1] = True
    assert np.all(batch["box_seg"][i][~in_box] == 0)
    # A dense CRF on the boxes recovers the shapes far better than the filled boxes would.
    assert np.mean(batch["box_seg"][i] == batch["mask"][i]) > 0.95


def _example_with_box_seg_as_mask(seed):
  """A shapes example whose mask is replaced by its own box_seg (so they must stay equal)."""
  ex = shapes.generate_example(seed, "train", 0, image_size=32)
  box_seg = weak_labels.box_seg_from_boxes(ex["image"], ex["boxes"], ex["box_classes"])
  return {"image": ex["image"], "boxes": ex["boxes"], "box_classes": ex["box_classes"],
          "mask": box_seg}


def test_box_seg_is_cropped_scaled_and_flipped_like_the_mask():
  source = [_example_with_box_seg_as_mask(s) for s in range(4)]
  assert any(np.any(ex["mask"] > 0) for ex in source)
  batches = data.train_batches(source, batch_size=2, crop_size=(24, 20), seed=1,
                               scale_range=(0.6, 1.5), hflip=True,
                               label_kinds=("mask",) + KINDS, num_threads=1)
  for _ in range(6):
    batch = next(batches)
    assert batch["box_seg"].shape == (2, 24, 20)
    np.testing.assert_array_equal(batch["box_seg"], batch["mask"])
    assert np.any(batch["valid"])


def test_box_seg_settings_and_a_source_without_boxes():
  source = [_example_with_box_seg_as_mask(0)]
  batch = next(data.eval_batches(source, batch_size=2, label_kinds=KINDS, num_threads=1,
                                 box_seg_settings={"max_pixels": 256}))
  assert batch["box_seg"].shape == (2, 32, 32)
  assert np.all(batch["box_seg"][1] == IGNORE_INDEX)  # the padding example
  no_boxes = [{"image": np.zeros((8, 8, 3), np.uint8), "mask": np.zeros((8, 8), np.int32)}]
  with pytest.raises(ValueError, match=r"\['box_seg'\] are not in this dataset.*"
                                       r"'box_seg' is computed from image, boxes, box_classes"):
    data.train_batches(no_boxes, batch_size=1, label_kinds=("box_seg",))

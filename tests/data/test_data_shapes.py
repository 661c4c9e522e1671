"""The procedural shapes dataset: determinism and consistency of every label kind."""
import numpy as np
import pytest

from jaxseg.data import features, shapes, weak_labels


def _examples(n, split="train", seed=0):
  return [shapes.generate_example(seed, split, i) for i in range(n)]


def test_generation_is_deterministic_and_order_independent():
  forward = _examples(6)
  backward = [shapes.generate_example(0, "train", i) for i in reversed(range(6))][::-1]
  for a, b in zip(forward, backward):
    assert a.keys() == b.keys()
    for k in a:
      assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
  # Encoded bytes (what goes to disk) are identical too.
  assert features.encode_example(forward[2])["image"] == features.encode_example(backward[2])["image"]


def test_examples_differ_by_index_split_and_seed():
  base = shapes.generate_example(0, "train", 3)["image"]
  for other in (shapes.generate_example(0, "train", 4), shapes.generate_example(0, "validation", 3),
                shapes.generate_example(1, "train", 3)):
    assert not np.array_equal(base, other["image"])


def test_label_kinds_are_consistent_with_the_mask():
  examples = _examples(60)
  for ex in examples:
    mask = ex["mask"]
    assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.uint8
    assert mask.dtype == np.uint8 and mask.max() < shapes.NUM_CLASSES
    inst, classes = ex["instance_masks"], ex["box_classes"]
    assert inst.shape == (shapes.MAX_INSTANCES, 64, 64) and classes.shape == (shapes.MAX_INSTANCES,)
    live = classes >= 0
    assert 1 <= live.sum() <= 4
    # Padding comes after live instances and is empty.
    assert np.all(live[:live.sum()]) and not inst[~live].any()
    # Visible instance masks are disjoint, carry their class, and tile the foreground.
    assert inst.sum(axis=0).max() <= 1
    for m, c in zip(inst[live], classes[live]):
      assert m.any() and np.all(mask[m == 1] == c)
    assert np.array_equal(inst.sum(axis=0) > 0, mask > 0)
    # Boxes are tight, inclusive.
    for m, box in zip(inst[live], ex["boxes"][live]):
      ys, xs = np.nonzero(m)
      np.testing.assert_array_equal(box, [ys.min(), xs.min(), ys.max(), xs.max()])
    assert not ex["boxes"][~live].any()
    # Tags are exactly the classes present.
    np.testing.assert_array_equal(np.nonzero(ex["tags"])[0], np.unique(mask))
    # Scribbled pixels carry the mask's class, and every object instance is touched.
    s = ex["scribble"]
    on = s != 255
    assert np.all(s[on] == mask[on])
  cover = weak_labels.scribble_coverage([ex["scribble"] for ex in examples])
  assert 0.01 <= cover <= 0.03, cover


def test_every_class_occurs_and_colour_does_not_reveal_the_class():
  examples = _examples(150)
  colours = {c: [] for c in range(1, shapes.NUM_CLASSES)}
  for ex in examples:
    for m, c in zip(ex["instance_masks"], ex["box_classes"]):
      if c >= 0:
        colours[int(c)].append(ex["image"][m == 1].mean(axis=0) / 255.0)
  for c, values in colours.items():
    assert len(values) > 30, c
    # Colours are uniform random: every class's mean colour sits near mid-grey.
    np.testing.assert_allclose(np.mean(values, axis=0), 0.5, atol=0.12)


def test_sizes_and_builder_configs():
  config = shapes.make_config()
  assert config.name == "default"
  small = shapes.make_config(num_train=5, num_validation=3, seed=2)
  assert small.name != config.name and "5" in small.name
  with pytest.raises(ValueError, match="num_train"):
    shapes.make_config(num_train=0)
  with pytest.raises(ValueError, match="unknown split"):
    shapes.generate_example(0, "test", 0)
  with pytest.raises(ValueError, match="unknown jaxseg_shapes settings"):
    shapes.make_builder(data_dir="/tmp", bogus=1)


def test_prepared_dataset_matches_the_generator(tiny_shapes):
  train, validation = tiny_shapes
  assert (len(train), len(validation)) == (24, 10)
  assert train.class_names == shapes.CLASS_NAMES and train.num_classes == shapes.NUM_CLASSES == 5
  assert train.builder.info.metadata["class_names"] == list(shapes.CLASS_NAMES)
  for split, source in (("train", train), ("validation", validation)):
    for i in (0, len(source) - 1):
      expected = shapes.generate_example(7, split, i)
      got = source[i]
      np.testing.assert_array_equal(got["image"], expected["image"])
      for k in ("mask", "scribble", "box_classes", "instance_masks"):
        np.testing.assert_array_equal(got[k], expected[k].astype(got[k].dtype))
      np.testing.assert_array_equal(got["boxes"], expected["boxes"])
      np.testing.assert_array_equal(got["tags"], expected["tags"])
      assert got["mask"].dtype == np.int32 and got["scribble"].dtype == np.int32
      assert got["instance_masks"].dtype == np.uint8 and got["boxes"].dtype == np.float32

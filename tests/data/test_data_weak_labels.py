"""Weak labels synthesised from masks: skeletons, geodesic paths, scribbles, boxes, tags."""
import numpy as np
import pytest
import scipy.ndimage as ndi
from scipy.sparse import csgraph, coo_matrix

from jaxseg.data import weak_labels as wl

EIGHT = np.ones((3, 3), bool)


def _blobs(seed, shape=(40, 50)):
  rng = np.random.default_rng(seed)
  return ndi.gaussian_filter(rng.normal(size=shape), 3) > 0.02


def test_skeleton_of_a_bar_is_its_middle_line():
  bar = np.zeros((9, 30), bool)
  bar[2:7, 3:27] = True
  skel = wl.skeletonize(bar)
  ys, xs = np.nonzero(skel)
  assert set(ys) == {4}  # the middle row of rows 2..6
  assert xs.min() <= 6 and xs.max() >= 23  # it spans most of the bar


def test_skeleton_keeps_topology_and_is_thin():
  for seed in range(25):
    region = _blobs(seed)
    skel = wl.skeletonize(region)
    assert np.all(region[skel])
    assert ndi.label(skel, EIGHT)[1] == ndi.label(region, EIGHT)[1]
    # No pixel of a one-pixel-wide skeleton is interior.
    assert not ndi.binary_erosion(skel, EIGHT).any()
  tiny = np.zeros((6, 6), bool)
  tiny[2:4, 2:4] = True  # erased whole by the textbook rules
  assert wl.skeletonize(tiny).sum() == 1


def test_skeleton_against_skimage():
  skimage_morphology = pytest.importorskip("skimage.morphology")
  close = []
  for seed in range(25):
    region = _blobs(seed)
    ours = wl.skeletonize(region)
    ref = skimage_morphology.skeletonize(region)
    assert ndi.label(ours, EIGHT)[1] == ndi.label(ref, EIGHT)[1]
    # Our skeleton runs along scikit-image's (which sometimes has extra short spurs).
    assert np.all(ndi.distance_transform_edt(~ref)[ours] <= 1.5)
    close.append(np.mean(ndi.distance_transform_edt(~ours)[ref] <= 1.5))
  assert np.mean(close) > 0.8


def _diameter_brute_force(skel):
  ys, xs = np.nonzero(skel)
  n = len(ys)
  d = np.maximum(np.abs(ys[:, None] - ys[None]), np.abs(xs[:, None] - xs[None]))
  rows, cols = np.nonzero(d == 1)
  dist = csgraph.shortest_path(coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n)).tocsr(),
                               unweighted=True)
  return dist.max()


def test_longest_path_is_the_tree_diameter():
  for seed in range(10):
    skel = wl.skeletonize(_blobs(seed, (30, 30)))
    labels, num = ndi.label(skel, EIGHT)
    piece = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    path = wl.longest_path(piece)
    # Consecutive pixels are 8-neighbours, pixels are distinct and on the skeleton.
    steps = np.abs(np.diff(path, axis=0)).max(axis=1)
    assert np.all(steps == 1) and len({tuple(p) for p in path}) == len(path)
    assert np.all(piece[path[:, 0], path[:, 1]])
    # Two BFS passes are exact on trees; skeletons may have loops, where they stay close.
    assert len(path) - 1 <= _diameter_brute_force(piece)
    assert len(path) - 1 >= 0.8 * _diameter_brute_force(piece)
  line = np.zeros((5, 12), bool)
  line[2, 1:11] = True
  line[1, 5] = True  # a one-pixel spur
  path = wl.longest_path(line)
  assert len(path) == 10 and {tuple(path[0]), tuple(path[-1])} == {(2, 1), (2, 10)}


def _two_class_mask():
  mask = np.zeros((48, 64), np.int32)
  mask[5:25, 5:30] = 1
  mask[30:45, 35:60] = 2
  mask[30:33, 5:8] = 1  # a tiny region: a click
  mask[0:2, :] = 255  # ignored rows are never scribbled
  return mask


def test_scribbles_carry_the_class_and_are_deterministic():
  mask = _two_class_mask()
  a, polylines = wl.scribbles_from_mask(mask, 3, return_polylines=True)
  b = wl.scribbles_from_mask(mask, 3)
  c = wl.scribbles_from_mask(mask, 4)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert a.dtype == np.int32 and a.shape == mask.shape
  on = a != 255
  assert np.all(a[on] == mask[on])
  # Every component of every class (background included) gets a stroke or a click.
  for cls in (0, 1, 2):
    labels, num = ndi.label(mask == cls, EIGHT)
    for k in range(1, num + 1):
      assert np.any(on & (labels == k)), (cls, k)
  assert len(polylines) == 4 and [p[0] for p in polylines] == [0, 1, 1, 2]
  # Strokes are 8-connected polylines inside their eroded region; the tiny region is a click.
  for cls, points in polylines:
    pts = np.array(points)
    if len(pts) > 1:
      assert np.all(np.abs(np.diff(pts, axis=0)).max(axis=1) == 1)
  assert any(len(p) == 1 for _, p in polylines)
  # Wider strokes contain the thin ones (same seed, same polylines) and stay in their class.
  wide = wl.scribbles_from_mask(mask, 3, width=3)
  assert np.all(wide[on] == a[on]) and (wide != 255).sum() > 2 * on.sum()
  assert np.all(wide[wide != 255] == mask[wide != 255])
  assert (wl.scribbles_from_mask(mask, 3, drop_prob=1.0) == 255).all()


def test_scribble_length_fraction():
  mask = np.zeros((40, 120), np.int32)
  mask[10:30, 5:115] = 1
  lengths = [len(p) for s in range(30)
             for c, p in wl.scribble_polylines_from_mask(mask, s) if c == 1]
  full = max(lengths)
  assert 0.25 * full <= min(lengths) and min(lengths) < 0.5 * full
  fixed = [len(p) for c, p in wl.scribble_polylines_from_mask(mask, 0, min_length=1.0) if c == 1]
  assert fixed[0] >= full


def test_coverage():
  s = np.full((10, 10), 255, np.int32)
  s[0, :3] = 1
  assert wl.scribble_coverage(s) == pytest.approx(0.03)
  assert wl.scribble_coverage([s, np.full((10, 10), 255)]) == pytest.approx(0.015)
  with pytest.raises(ValueError, match="no pixels"):
    wl.scribble_coverage([])


def test_boxes_from_mask_merge_touching_instances():
  mask = np.zeros((20, 20), np.int32)
  mask[2:5, 2:6] = 1
  mask[5:8, 6:9] = 1  # touches the first diagonally: one component
  mask[12:15, 12:18] = 1
  mask[10:12, 0:3] = 2
  boxes, classes = wl.boxes_from_mask(mask)
  np.testing.assert_array_equal(classes, [1, 1, 2])
  np.testing.assert_array_equal(boxes, [[2, 2, 7, 8], [12, 12, 14, 17], [10, 0, 11, 2]])
  boxes, classes = wl.boxes_from_mask(mask, max_instances=2)
  np.testing.assert_array_equal(classes, [1, 1])  # the two largest
  boxes, classes = wl.boxes_from_mask(mask, background=())
  assert 0 in classes.tolist()


def test_boxes_from_instances_and_padding():
  inst = np.zeros((3, 8, 8), np.uint8)
  inst[0, 1:3, 2:7] = 1
  inst[2, 5, 5] = 1
  boxes, classes = wl.boxes_from_instances(inst, np.array([4, 2, -1]))
  np.testing.assert_array_equal(boxes, [[1, 2, 2, 6], [0, 0, 0, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(classes, [4, -1, -1])
  padded, pclasses = wl.pad_instances(inst, np.array([4, 2, 1]), 5)
  assert padded.shape == (5, 8, 8) and pclasses.tolist() == [4, 2, 1, -1, -1]
  with pytest.raises(ValueError, match="rank 3"):
    wl.boxes_from_instances(inst[0], np.array([1]))


def test_tags():
  mask = np.array([[0, 0, 3], [3, 255, 255]], np.uint8)
  np.testing.assert_array_equal(wl.tags_from_mask(mask, 5), [1, 0, 0, 1, 0])
  np.testing.assert_array_equal(wl.tags_from_mask(mask, 5, min_pixels=3), [0, 0, 0, 0, 0])
  with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
    wl.tags_from_mask(mask, 3)


def test_large_tags():
  mask = np.zeros((10, 10), np.uint8)
  mask[:1, :] = 1  # 10%: not more than 10%
  mask[1:3, :] = 2  # 20%
  mask[9, :] = 255  # ignored pixels still count in the image's size
  np.testing.assert_array_equal(wl.large_tags_from_mask(mask, 4), [1, 0, 1, 0])
  np.testing.assert_array_equal(wl.large_tags_from_mask(mask, 4, fraction=0.05), [1, 1, 1, 0])
  with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
    wl.large_tags_from_mask(mask, 2)


def test_bad_masks():
  with pytest.raises(TypeError, match="integer dtype"):
    wl.scribbles_from_mask(np.zeros((4, 4), np.float32), 0)
  with pytest.raises(ValueError, match=r"rank 2 \[H, W\], got shape \(1, 4, 4\)"):
    wl.tags_from_mask(np.zeros((1, 4, 4), np.int32), 2)
  with pytest.raises(ValueError, match="min_length"):
    wl.scribbles_from_mask(np.zeros((4, 4), np.int32), 0, min_length=0.0)


def test_synthesize_adds_missing_kinds_only():
  mask = _two_class_mask()
  out = wl.synthesize({"mask": mask}, 5, num_classes=3)
  assert set(out) == {"mask", "scribble", "boxes", "box_classes", "tags", "tags_large",
                      "instance_masks"}
  np.testing.assert_array_equal(out["scribble"], wl.scribbles_from_mask(mask, 5))
  np.testing.assert_array_equal(out["tags"], [1, 1, 1])
  np.testing.assert_array_equal(out["tags_large"], wl.large_tags_from_mask(mask, 3))
  assert out["instance_masks"].shape == (8, 48, 64) and out["box_classes"].tolist()[:3] == [1, 1, 2]
  tight, _ = wl.boxes_from_instances(out["instance_masks"], out["box_classes"])
  np.testing.assert_array_equal(out["boxes"], tight)
  given = np.zeros(3, np.float32)
  kept = wl.synthesize({"mask": mask, "tags": given}, 5, num_classes=3, kinds=("tags",))
  assert kept["tags"] is given and "scribble" not in kept
  with pytest.raises(ValueError, match="needs a 'mask'"):
    wl.synthesize({"image": mask}, 0, num_classes=3)
  with pytest.raises(ValueError, match="unknown weak label kinds"):
    wl.synthesize({"mask": mask}, 0, num_classes=3, kinds=("points",))
  with pytest.raises(ValueError, match="'box_seg' needs the 'image'"):
    wl.synthesize({"mask": mask}, 0, num_classes=3, kinds=("box_seg",))


def test_synthesize_box_seg_on_request():
  """WSSL's Bbox-Seg labels from the mask's boxes: background outside them, the object inside."""
  mask = np.zeros((24, 24), np.int32)
  mask[6:14, 8:18] = 2
  image = np.full((24, 24, 3), 90, np.uint8)
  image[mask == 2] = [220, 40, 40]
  out = wl.synthesize({"mask": mask, "image": image}, 0, num_classes=3, kinds=("box_seg",))
  assert set(out) == {"mask", "image", "box_seg"}  # the boxes it needed are not added
  assert out["box_seg"].dtype == np.int32
  np.testing.assert_array_equal(out["box_seg"], mask)  # a tight box on a flat object

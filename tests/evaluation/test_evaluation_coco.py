"""COCO AP from dataset arrays and model outputs, and instance overlays.

Expected AP values are worked out by hand from COCO's definition (101-point interpolated
precision, IoU thresholds 0.50:0.05:0.95); box IoUs are checked with torchvision.ops.box_iou.
"""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from jaxseg.evaluation import coco
from jaxseg.evaluation import visualize

NAMES = ("background", "person", "car")
H, W = 48, 64


def rect(r0, c0, r1, c1, shape=(H, W)):
  m = np.zeros(shape, np.uint8)
  m[r0:r1 + 1, c0:c1 + 1] = 1
  return m


def example(objects, m=4):
  """A dataset example: ``objects`` [(class, (y0, x0, y1, x1) inclusive)], padded to m."""
  boxes = np.zeros((m, 4), np.float32)
  classes = np.full((m,), -1, np.int32)
  masks = np.zeros((m, H, W), np.uint8)
  for j, (c, box) in enumerate(objects):
    boxes[j], classes[j], masks[j] = box, c, rect(*box)
  return {"image": np.zeros((H, W, 3), np.uint8), "boxes": boxes, "box_classes": classes,
          "instance_masks": masks}


def outputs(dets, k=5):
  """Model outputs for one image: ``dets`` [(class, (y0, x0, y1, x1) continuous, score)]."""
  out = {"boxes": np.zeros((1, k, 4), np.float32), "scores": np.zeros((1, k), np.float32),
         "classes": np.zeros((1, k), np.int32), "valid": np.zeros((1, k), bool),
         "masks": np.zeros((1, k, H, W), np.float32)}
  for j, (c, box, score) in enumerate(dets):
    y0, x0, y1, x1 = box
    out["boxes"][0, j], out["scores"][0, j], out["classes"][0, j] = box, score, c
    out["valid"][0, j] = True
    rows = slice(int(np.floor(y0)), int(np.ceil(y1)))
    cols = slice(int(np.floor(x0)), int(np.ceil(x1)))
    out["masks"][0, j, rows, cols] = 0.9  # probabilities over the box's pixels
  return out


def evaluate(examples, dets_per_image, **kw):
  gt = coco.coco_ground_truth(examples, NAMES)
  dets = []
  for i, d in enumerate(dets_per_image):
    dets += coco.coco_detections(outputs(d), [i])
  return coco.evaluate_coco(gt, dets, **kw)


def test_perfect_detections_give_ap_one():
  examples = [example([(1, (0, 0, 9, 9)), (2, (10, 20, 47, 60))]),   # small and medium objects
              example([(2, (5, 5, 40, 40)), (1, (2, 44, 30, 63))]),
              example([])]                                          # no objects
  gt = coco.coco_ground_truth(examples, NAMES)
  dets = []
  for i, ex in enumerate(examples):
    live = ex["box_classes"] >= 0
    out = {"boxes": (ex["boxes"] + [0, 0, 1, 1])[None],  # inclusive -> continuous
           "scores": np.ones((1, 4)), "classes": ex["box_classes"][None], "valid": live[None],
           "masks": ex["instance_masks"][None].astype(np.float32)}
    dets += coco.coco_detections(out, [i])
  assert len(dets) == 4
  metrics = coco.evaluate_coco(gt, dets)
  for prefix in ("box", "mask"):
    for name in ("AP", "AP50", "AP75", "APs", "APm", "AR1", "AR100"):
      assert metrics[f"{prefix}_{name}"] == pytest.approx(1.0), (prefix, name)
    assert metrics[f"{prefix}_APl"] == -1  # no object over 96^2 pixels: undefined, as COCO says
  assert set(metrics) == {f"{p}_{n}" for p in ("box", "mask") for n in coco.STAT_NAMES}


def test_one_detection_at_iou_0625():
  # gt rows/cols 0..9 (10x10); detection rows [0, 10), cols [0, 16): IoU 100 / 160.
  gt_box, det_box = (0, 0, 9, 9), (0, 0, 10, 16)
  iou = box_iou(torch.tensor([[0., 0., 10., 10.]]), torch.tensor([[0., 0., 16., 10.]]))
  assert float(iou) == pytest.approx(0.625)
  metrics = evaluate([example([(1, gt_box)])], [[(1, det_box, 0.9)]])
  for prefix in ("box", "mask"):  # the mask covers the same pixels as the box
    assert metrics[f"{prefix}_AP50"] == pytest.approx(1.0)
    assert metrics[f"{prefix}_AP75"] == pytest.approx(0.0)
    # Matched at the thresholds 0.50, 0.55, 0.60 of ten: AP = 3/10.
    assert metrics[f"{prefix}_AP"] == pytest.approx(0.3)
    assert metrics[f"{prefix}_APs"] == pytest.approx(0.3)  # area 100 < 32^2


def test_scores_rank_detections():
  examples = [example([(1, (0, 0, 9, 9)), (1, (20, 20, 29, 29))])]
  tp_a, tp_b, fp = (1, (0, 0, 10, 10), None), (1, (20, 20, 30, 30), None), (1, (35, 40, 45, 50),
                                                                             None)

  def scored(*pairs):
    return [[(c, box, s) for (c, box, _), s in pairs]]

  # The false positive first: precision 0/1, 1/2, 2/3 at recall 0, .5, 1; interpolated to 2/3.
  worst = evaluate(examples, scored((fp, 0.9), (tp_a, 0.8), (tp_b, 0.7)))
  assert worst["box_AP50"] == pytest.approx(2 / 3, abs=1e-9)
  # The order of the list does not matter, only the scores.
  shuffled = evaluate(examples, scored((tp_b, 0.7), (fp, 0.9), (tp_a, 0.8)))
  assert shuffled == worst
  # The false positive last: every recall level is reached at precision 1.
  best = evaluate(examples, scored((fp, 0.1), (tp_a, 0.8), (tp_b, 0.7)))
  assert best["box_AP50"] == pytest.approx(1.0) and best["mask_AP50"] == pytest.approx(1.0)


def test_inclusive_gt_equals_continuous_detection():
  # Rows 0..9 / cols 5..14 inclusive == rows [0, 10) / cols [5, 15) continuous: IoU 1.
  gt = coco.coco_ground_truth([example([(2, (0, 5, 9, 14))])], NAMES)
  ann = gt.loadAnns(gt.getAnnIds())[0]
  assert ann["bbox"] == [5.0, 0.0, 10.0, 10.0] and ann["area"] == 100
  det = coco.coco_detections(outputs([(2, (0, 5, 10, 15), 0.5)]), [0])[0]
  assert det["bbox"] == [5.0, 0.0, 10.0, 10.0]
  x, y, w, h = ann["bbox"]
  dx, dy, dw, dh = det["bbox"]
  assert float(box_iou(torch.tensor([[x, y, x + w, y + h]]),
                       torch.tensor([[dx, dy, dx + dw, dy + dh]]))) == 1.0
  metrics = coco.evaluate_coco(gt, [det])
  assert metrics["box_AP"] == pytest.approx(1.0) and metrics["mask_AP"] == pytest.approx(1.0)


def test_no_detections_and_images_without_gt():
  examples = [example([(1, (0, 0, 9, 9))]), example([])]
  metrics = evaluate(examples, [[], []])
  assert metrics["box_AP"] == 0.0 and metrics["mask_AP"] == 0.0 and metrics["box_AR100"] == 0.0
  # A detection on the image without objects is a false positive ranked above the true one.
  metrics = evaluate(examples, [[(1, (0, 0, 10, 10), 0.5)], [(1, (0, 0, 10, 10), 0.9)]])
  assert metrics["box_AP50"] == pytest.approx(0.5)
  # No ground truth at all: COCO's "undefined" (-1), no crash.
  metrics = evaluate([example([])], [[(1, (0, 0, 10, 10), 0.9)]])
  assert metrics["box_AP"] == -1 and metrics["mask_AP"] == -1


def test_detections_conventions():
  out = outputs([(1, (2.5, 3.0, 12.5, 13.0), 0.8), (2, (0, 0, 4, 4), 0.7)])
  out["valid"][0, 1] = False
  out["masks"][0, 0] = 0.0
  out["masks"][0, 0, 3:5, 4:6] = [[0.5, 0.51], [0.9, 0.2]]  # strictly above 0.5 is inside
  dets = coco.coco_detections(out, [7], category_ids=[0, 1, 3])
  assert len(dets) == 1
  det = dets[0]
  assert det["image_id"] == 7 and det["category_id"] == 1 and det["score"] == pytest.approx(0.8)
  assert det["bbox"] == [3.0, 2.5, 10.0, 10.0]
  from pycocotools import mask as mask_utils
  decoded = mask_utils.decode({**det["segmentation"],
                               "counts": det["segmentation"]["counts"].encode()})
  np.testing.assert_array_equal(np.argwhere(decoded), [[3, 5], [4, 4]])
  assert coco.coco_detections(out, [-1]) == []  # padding rows are left out
  with pytest.raises(ValueError, match="image_ids must hold 1"):
    coco.coco_detections(out, [1, 2])
  with pytest.raises(ValueError, match="missing 'scores'"):
    coco.coco_detections({"boxes": out["boxes"], "classes": out["classes"]}, [0])


def test_evaluate_errors():
  gt = coco.coco_ground_truth([example([(1, (0, 0, 9, 9))])], NAMES)
  det = coco.coco_detections(outputs([(1, (0, 0, 10, 10), 0.9)]), [3])
  with pytest.raises(ValueError, match="image ids \\[3\\]"):
    coco.evaluate_coco(gt, det)
  boxes_only = [{k: v for k, v in d.items() if k != "segmentation"}
                for d in coco.coco_detections(outputs([(1, (0, 0, 10, 10), 0.9)]), [0])]
  with pytest.raises(ValueError, match="segmentation"):
    coco.evaluate_coco(gt, boxes_only)
  assert coco.evaluate_coco(gt, boxes_only, iou_types=("bbox",))["box_AP"] == pytest.approx(1.0)
  with pytest.raises(ValueError, match="iou_types"):
    coco.evaluate_coco(gt, [], iou_types=("keypoints",))


def test_instance_evaluator_over_batches():
  exs = [example([(1, (0, 0, 9, 9))]), example([(2, (10, 10, 29, 29))]), example([])]
  batch = {k: np.stack([e[k] for e in exs]) for k in exs[0]}
  batch["index"] = np.array([0, 1, -1], np.int32)  # the last one is padding
  batch["valid"] = np.ones((3, H, W), bool)
  batch["valid"][2] = False
  out = {k: np.concatenate([outputs([(1, (0, 0, 10, 10), 0.9)])[k],
                            outputs([(2, (10, 10, 30, 30), 0.8)])[k],
                            outputs([(1, (0, 0, 10, 10), 0.99)])[k]]) for k in outputs([])}
  evaluator = coco.InstanceEvaluator(NAMES, prefix="val/")
  evaluator.add({k: v[:2] for k, v in out.items()}, {k: v[:2] for k, v in batch.items()})
  evaluator.add({k: v[2:] for k, v in out.items()}, {k: v[2:] for k, v in batch.items()})
  result = dict(evaluator.result())
  # The padding example's confident detection is not counted.
  assert result["val/box_AP"] == pytest.approx(1.0) and result["val/mask_AP"] == pytest.approx(1.0)
  assert dict(evaluator.run()) == result
  with pytest.raises(ValueError, match="added twice"):
    evaluator.add({k: v[:1] for k, v in out.items()}, {k: v[:1] for k, v in batch.items()})
  small = {**out, "masks": out["masks"][:, :, :28, :28]}
  with pytest.raises(ValueError, match="paste"):
    coco.InstanceEvaluator(NAMES).add(small, batch)
  boxes_only = coco.InstanceEvaluator(NAMES, iou_types=("bbox",))
  boxes_only.add({k: v for k, v in out.items() if k != "masks"}, batch)
  assert [n for n, _ in boxes_only.run()] == [f"box_{n}" for n in coco.STAT_NAMES]


# ----------------------------------------------------------------------------------------------
# Overlays.


def test_draw_instances_tints_masks_and_outlines_boxes():
  image = np.full((H, W, 3), 100, np.uint8)
  color = visualize.palette(len(NAMES))[2]  # car
  boxes = np.array([[4, 8, 20, 30], [30, 30, 40, 40], [0, 0, 10, 10]], np.float32)
  masks = np.zeros((3, H, W), np.float32)
  masks[0, 8:12, 12:20] = 0.8
  masks[1, 30:40, 30:40] = 0.9
  masks[2, :10, :10] = 0.9
  out = visualize.draw_instances(image, boxes, [2, 1, 1], [0.9, 0.95, 0.2], masks,
                                 [True, False, True], NAMES, alpha=0.5)
  expected_tint = np.round(0.5 * color + 0.5 * 100).astype(np.uint8)
  np.testing.assert_array_equal(out[10, 15], expected_tint)          # inside the mask
  # Continuous box rows [4, 20), cols [8, 30): outline rows 4 and 19, columns 8 and 29.
  for r, c in ((4, 8), (4, 20), (19, 29), (12, 8), (12, 29), (19, 15)):
    np.testing.assert_array_equal(out[r, c], color, f"{r},{c}")
  np.testing.assert_array_equal(out[20, 15], [100, 100, 100])       # just below the box
  np.testing.assert_array_equal(out[6, 10], [100, 100, 100])        # inside, not in the mask
  np.testing.assert_array_equal(out[35, 35], [100, 100, 100])       # invalid: not drawn
  np.testing.assert_array_equal(out[0, 0], [100, 100, 100])         # below the score threshold
  # Ground truth (inclusive boxes, no scores): rows 0..9 -> outline rows 0 and 9.
  gt = visualize.draw_instances(image, [[0, 0, 9, 9], [0, 0, 0, 0]], [1, -1], None, None, None,
                                NAMES, inclusive=True)
  person = visualize.palette(len(NAMES))[1]
  np.testing.assert_array_equal(gt[9, 5], person)
  np.testing.assert_array_equal(gt[10, 5], [100, 100, 100])
  np.testing.assert_array_equal(gt[5, 5], [100, 100, 100])
  with pytest.raises(ValueError, match="image resolution"):
    visualize.draw_instances(image, boxes, [2, 1, 1], None, masks[:, :10], None, NAMES)


def test_save_instance_grid(tmp_path):
  exs = [example([(1, (0, 0, 9, 9))]), example([(2, (10, 10, 29, 29))])]
  gt = {k: np.stack([e[k] for e in exs]) for k in ("boxes", "box_classes", "instance_masks")}
  images = np.full((2, H, W, 3), 0.5, np.float32)
  preds = {k: np.concatenate([outputs([(1, (0, 0, 10, 10), 0.9)])[k],
                              outputs([(2, (10, 10, 30, 30), 0.8)])[k]]) for k in outputs([])}
  grid = visualize.instance_grid(images, gt, preds, NAMES)
  assert grid.shape == (2 * H + 2, 3 * W + 4, 3)
  np.testing.assert_array_equal(grid[0, 0], [128, 128, 128])        # the image itself
  np.testing.assert_array_equal(grid[0, W + 2], visualize.palette(3)[1])  # gt outline
  # Lists of per-example dicts (what a trainer keeps) give the same grid.
  as_lists = visualize.instance_grid(
      images, [{k: v[i] for k, v in gt.items()} for i in range(2)],
      [{k: v[i] for k, v in preds.items()} for i in range(2)], NAMES)
  np.testing.assert_array_equal(as_lists, grid)
  path = tmp_path / "grid.png"
  visualize.save_instance_grid(str(path), images, gt, preds, NAMES, min_size=128)
  with Image.open(path) as im:
    assert im.size == (grid.shape[1] * 2, grid.shape[0] * 2)
  assert visualize.instance_grid(images, None, preds, NAMES).shape == (2 * H + 2, 2 * W + 2, 3)

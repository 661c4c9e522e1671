"""jaxseg.ops.anchors against torchvision's AnchorGenerator."""
import numpy as np
import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from jaxseg import ops


def test_base_anchors_hand_computed():
  # ar 0.5: h = sqrt(.5)*32 = 22.63 -> +-11.31 -> 11; w = 45.25 -> +-22.63 -> 23.
  np.testing.assert_array_equal(ops.base_anchors((32,), (0.5, 1.0, 2.0)),
                                [[-11, -23, 11, 23], [-16, -16, 16, 16], [-23, -11, 23, 11]])


def test_base_anchors_multi_scale_order_matches_torchvision():
  gen = AnchorGenerator(((32, 64, 128),), ((0.5, 1.0, 2.0),))
  want = gen.cell_anchors[0].numpy()
  got = ops.base_anchors((32, 64, 128), (0.5, 1.0, 2.0))
  assert got.dtype == np.float32
  np.testing.assert_array_equal(ops.to_xyxy(got), want)


@pytest.mark.parametrize("canvas,levels", [
    ((96, 128), [(24, 32), (12, 16), (6, 8), (3, 4), (2, 2)]),
    ((64, 96), [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]),
])
def test_grid_anchors_match_anchor_generator(canvas, levels):
  gen = AnchorGenerator(ops.DEFAULT_SIZES, ops.DEFAULT_ASPECT_RATIOS)
  images = ImageList(torch.zeros(2, 3, *canvas), [(canvas[0] - 5, canvas[1] - 3)] * 2)
  feats = [torch.zeros(2, 4, h, w) for h, w in levels]
  want = gen(images, feats)[0].numpy()
  got = ops.grid_anchors(canvas, levels)
  assert [g.shape for g in got] == [(h * w * 3, 4) for h, w in levels]
  assert all(g.dtype == np.float32 for g in got)
  np.testing.assert_array_equal(ops.to_xyxy(np.concatenate(got)), want)


def test_grid_anchors_validates():
  with pytest.raises(ValueError, match="one sizes"):
    ops.grid_anchors((64, 64), [(16, 16)])
  with pytest.raises(ValueError, match="image_size"):
    ops.grid_anchors((64,), [(16, 16)], ((32,),), ((1.0,),))
  with pytest.raises(ValueError, match="positive"):
    ops.base_anchors((32,), (0.0,))

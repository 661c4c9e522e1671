"""ScribbleSup XML reading, writing and rasterisation."""
import pathlib

import numpy as np
import pytest

from jaxseg.data import scribblesup

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "scribblesup_2007_000032.xml"
VOC = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
       "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
       "train", "tvmonitor")


def test_read_fixture():
  height, width, scribbles = scribblesup.read_scribblesup_xml(FIXTURE, VOC)
  assert (height, width) == (10, 12)
  assert scribbles == [(0, [(0, 0), (6, 0), (6, 3)]), (1, [(2, 8), (10, 4)]), (15, [(11, 9)])]


def test_rasterize_width_1_and_3_by_hand():
  height, width, scribbles = scribblesup.read_scribblesup_xml(FIXTURE, VOC)
  thin = scribblesup.rasterize_scribbles(height, width, scribbles, width_px=1)
  assert thin.dtype == np.int32 and thin.shape == (10, 12)
  expected = np.full((10, 12), 255, np.int32)
  expected[0, 0:7] = 0
  expected[0:4, 6] = 0
  # (2,8) -> (10,4): 8 steps in x, y falls by 1/2 per step, rounded half away from zero.
  for k in range(9):
    y = 8 - k / 2
    expected[int(np.floor(y + 0.5)), 2 + k] = 1
  expected[9, 11] = 15
  np.testing.assert_array_equal(thin, expected)
  wide = scribblesup.rasterize_scribbles(height, width, scribbles, width_px=3)
  assert np.all(wide[thin != 255] != 255)
  assert wide[1, 1] == 0 and wide[8, 10] == 15 and wide[9, 10] == 15  # square brush, clipped
  assert (wide != 255).sum() > 2 * (thin != 255).sum()


def test_segment_is_symmetric():
  forward = scribblesup.rasterize_scribbles(20, 20, [(3, [(1, 2), (18, 9)])], width_px=1)
  backward = scribblesup.rasterize_scribbles(20, 20, [(3, [(18, 9), (1, 2)])], width_px=1)
  np.testing.assert_array_equal(forward, backward)
  # 8-connected, one pixel per column.
  assert ((forward != 255).sum(axis=0)[1:19] == 1).all()


def test_round_trip(tmp_path):
  scribbles = [(0, [(0, 0), (5, 5)]), (7, [(3, 1), (3, 8), (9, 8)])]
  path = tmp_path / "a.xml"
  scribblesup.write_scribblesup_xml(path, 10, 12, scribbles, VOC)
  assert scribblesup.read_scribblesup_xml(path, VOC) == (10, 12, scribbles)


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.xml"):
    scribblesup.read_scribblesup_xml(tmp_path / "nope.xml", VOC)
  with pytest.raises(ValueError, match="unknown class 'aeroplane'"):
    scribblesup.read_scribblesup_xml(FIXTURE, ("background", "person"))
  bad = tmp_path / "bad.xml"
  bad.write_text("<annotation><polygon>")
  with pytest.raises(ValueError, match="not valid XML"):
    scribblesup.read_scribblesup_xml(bad, VOC)
  bad.write_text("<annotation><polygon><tag>cat</tag></polygon></annotation>")
  with pytest.raises(ValueError, match="missing <size>"):
    scribblesup.read_scribblesup_xml(bad, VOC)
  bad.write_text("<annotation><size><width>4</width><height>4</height></size><polygon><tag>cat</tag>"
                 "<point><X>a</X><Y>1</Y></point></polygon></annotation>")
  with pytest.raises(ValueError, match="not a number"):
    scribblesup.read_scribblesup_xml(bad, VOC)
  with pytest.raises(ValueError, match="odd"):
    scribblesup.rasterize_scribbles(4, 4, [], width_px=2)
  with pytest.raises(ValueError, match="out of range"):
    scribblesup.rasterize_scribbles(4, 4, [(255, [(0, 0)])])

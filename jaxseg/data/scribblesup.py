"""Scribbles as polylines: the ScribbleSup XML format and rasterisation.

The ScribbleSup release (Lin et al., CVPR'16) stores one XML file per image::

  <annotation>
    <size><width>500</width><height>375</height></size>
    <polygon>
      <tag>person</tag>
      <point><X>167</X><Y>46</Y></point>
      <point><X>170</X><Y>52</Y></point>
      ...
    </polygon>
    ...
  </annotation>

Each ``polygon`` is one scribble: an ordered polyline of 0-based pixel coordinates, tagged with a
class name (``background`` included). The rloss pipeline draws each polyline as line segments of
width 3 onto a map filled with 255 (ignore); the Gated CRF pipeline uses width 1.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from typing import Sequence

import numpy as np

from jaxseg.constants import IGNORE_INDEX


Polyline = list[tuple[int, int]]


def read_scribblesup_xml(
    path: str | os.PathLike, class_names: Sequence[str]
) -> tuple[int, int, list[tuple[int, Polyline]]]:
  """Reads one ScribbleSup annotation file.

  Args:
    path: the XML file.
    class_names: names indexed by class id; a scribble's ``tag`` is looked up here
      (case-insensitive, surrounding spaces ignored).

  Returns:
    ``(height, width, scribbles)`` where ``scribbles`` is a list of
    ``(class_id, [(x, y), ...])`` in file order, coordinates as 0-based ints.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: malformed XML, missing size, an unknown tag or a bad coordinate.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"ScribbleSup annotation not found: {path}")
  try:
    root = ET.parse(path).getroot()
  except ET.ParseError as e:
    raise ValueError(f"{path}: not valid XML ({e})") from e
  lookup = {name.strip().lower(): i for i, name in enumerate(class_names)}

  def _int(node, tag, where):
    child = node.find(tag)
    if child is None or child.text is None:
      raise ValueError(f"{path}: missing <{tag}> in {where}")
    try:
      return int(round(float(child.text.strip())))
    except ValueError as e:
      raise ValueError(f"{path}: <{tag}> in {where} is not a number: {child.text!r}") from e

  size = root.find("size")
  if size is None:
    raise ValueError(f"{path}: missing <size>")
  width = _int(size, "width", "<size>")
  height = _int(size, "height", "<size>")
  scribbles = []
  for k, polygon in enumerate(root.iter("polygon")):
    tag = polygon.find("tag")
    if tag is None or tag.text is None:
      raise ValueError(f"{path}: <polygon> #{k} has no <tag>")
    name = tag.text.strip().lower()
    if name not in lookup:
      raise ValueError(f"{path}: unknown class {tag.text.strip()!r} in <polygon> #{k}; "
                       f"known: {list(class_names)}")
    points = [(_int(p, "X", f"<polygon> #{k}"), _int(p, "Y", f"<polygon> #{k}"))
              for p in polygon.findall("point")]
    if points:
      scribbles.append((lookup[name], points))
  return height, width, scribbles


def write_scribblesup_xml(
    path: str | os.PathLike, height: int, width: int,
    scribbles: Sequence[tuple[int, Sequence[tuple[int, int]]]], class_names: Sequence[str],
) -> None:
  """Writes scribbles in the ScribbleSup XML format (the inverse of `read_scribblesup_xml`)."""
  root = ET.Element("annotation")
  size = ET.SubElement(root, "size")
  ET.SubElement(size, "width").text = str(int(width))
  ET.SubElement(size, "height").text = str(int(height))
  for class_id, points in scribbles:
    polygon = ET.SubElement(root, "polygon")
    ET.SubElement(polygon, "tag").text = class_names[class_id]
    for x, y in points:
      point = ET.SubElement(polygon, "point")
      ET.SubElement(point, "X").text = str(int(x))
      ET.SubElement(point, "Y").text = str(int(y))
  ET.ElementTree(root).write(os.fspath(path), encoding="utf-8", xml_declaration=False)


def _polyline_pixels(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Pixels (ys, xs) of the digital straight segments joining consecutive points (ends included).

  Each segment with n = max(|dx|, |dy|) steps is sampled at n + 1 evenly spaced points rounded
  half away from zero, so a segment and its reverse cover the same pixels.
  """
  if len(points) == 1:
    return points[:, 1], points[:, 0]
  a, b = points[:-1], points[1:]
  steps = np.maximum(np.abs(b - a).max(axis=1), 1)
  seg = np.repeat(np.arange(len(a)), steps + 1)
  t = np.arange(len(seg)) - np.repeat(np.cumsum(steps + 1) - (steps + 1), steps + 1)
  t = t / steps[seg]
  xy = a[seg] + t[:, None] * (b[seg] - a[seg])
  xy = np.sign(xy) * np.floor(np.abs(xy) + 0.5)
  xy = xy.astype(np.int64)
  return xy[:, 1], xy[:, 0]


def rasterize_scribbles(
    height: int, width: int, scribbles: Sequence[tuple[int, Sequence[tuple[int, int]]]], *,
    width_px: int = 3,
) -> np.ndarray:
  """Draws polylines onto a label map.

  Args:
    height, width: output size.
    scribbles: ``[(class_id, [(x, y), ...]), ...]``; consecutive points are joined by straight
      segments, a single point is a click. Later scribbles overwrite earlier ones.
    width_px: stroke width in pixels (odd; 3 as in rloss, 1 as in Gated CRF). A stroke of width
      w covers the w x w square around every pixel of the 1-pixel line.

  Returns:
    int32 [height, width]: the class on drawn pixels, 255 elsewhere. Points outside the image
    are clipped.
  """
  if width_px < 1 or width_px % 2 != 1:
    raise ValueError(f"width_px must be a positive odd integer, got {width_px}")
  out = np.full((height, width), IGNORE_INDEX, np.int32)
  r = width_px // 2
  for class_id, points in scribbles:
    if not 0 <= class_id < IGNORE_INDEX:
      raise ValueError(f"scribble class id {class_id} out of range [0, {IGNORE_INDEX})")
    if len(points) == 0:
      continue
    ys, xs = _polyline_pixels(np.asarray(points, np.int64).reshape(-1, 2))
    for dy in range(-r, r + 1):
      for dx in range(-r, r + 1):
        yy, xx = ys + dy, xs + dx
        keep = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
        out[yy[keep], xx[keep]] = class_id
  return out

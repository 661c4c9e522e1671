"""Confusion matrix, IoU and the table against hand-computed cases."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.evaluation import metrics


def test_confusion_matrix_hand_computed():
  labels = jnp.array([[[0, 0, 1, 1], [2, 2, 255, 1]]])
  preds = jnp.array([[[0, 1, 1, 1], [2, 0, 2, 0]]])
  cm = metrics.confusion_matrix(preds, labels, 3)
  # rows: truth, cols: prediction; the 255 pixel is ignored.
  np.testing.assert_array_equal(cm, [[1, 1, 0], [1, 2, 0], [1, 0, 1]])


def test_confusion_matrix_respects_valid_and_jit():
  labels = jnp.array([[[0, 1], [1, 1]]])
  preds = jnp.array([[[0, 0], [1, 1]]])
  valid = jnp.array([[[True, False], [True, True]]])
  cm = jax.jit(metrics.confusion_matrix, static_argnums=2)(preds, labels, 2, valid)
  np.testing.assert_array_equal(cm, [[1, 0], [0, 2]])


def test_iou_and_summary():
  cm = np.array([[1, 1, 0], [1, 2, 0], [1, 0, 1]])
  iou = metrics.iou_from_confusion(cm)
  np.testing.assert_allclose(iou, [1 / 4, 2 / 4, 1 / 2])
  s = metrics.summarize(cm, ["bg", "a", "b"])
  assert s["miou"] == pytest.approx((0.25 + 0.5 + 0.5) / 3)
  assert s["pixel_accuracy"] == pytest.approx(4 / 7)
  assert s["iou/a"] == pytest.approx(0.5)


def test_absent_class_is_nan_and_excluded_from_miou():
  cm = np.array([[3, 0, 0], [0, 1, 0], [0, 0, 0]])
  s = metrics.summarize(cm)
  assert np.isnan(s["iou/2"])
  assert s["miou"] == pytest.approx(1.0)
  table = metrics.format_iou_table(cm, ["bg", "x", "y"])
  assert "n/a" in table and "mIoU" in table and "100.00" in table

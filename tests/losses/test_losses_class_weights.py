"""Median-frequency class weights against a hand-computed case."""
import numpy as np
import pytest

from jaxseg.losses.supervised import median_frequency_weights


def test_median_frequency_hand_computed():
  a = np.array([[0, 0], [0, 1]])      # class 0: 3 px, class 1: 1 px (image of 4 px)
  b = np.array([[0, 2], [2, 255]])    # class 0: 1 px, class 2: 2 px (3 labelled px)
  w = median_frequency_weights([a, b], 4)
  freq = np.array([4 / 7, 1 / 4, 2 / 3])  # pixels of c / pixels of images containing c
  med = np.median(freq)
  np.testing.assert_allclose(w, [med / freq[0], med / freq[1], med / freq[2], 0.0], rtol=1e-6)


def test_median_frequency_rejects_empty():
  with pytest.raises(ValueError, match="no labelled pixel"):
    median_frequency_weights([np.full((2, 2), 255)], 3)

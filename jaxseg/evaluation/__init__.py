"""Evaluation: confusion matrix, IoU, tables."""
from jaxseg.evaluation.metrics import (confusion_matrix, format_iou_table, iou_from_confusion,
                                       summarize)

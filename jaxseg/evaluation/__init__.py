"""Evaluation: confusion matrix, IoU, tables; sliding-window and multi-scale inference."""
from jaxseg.evaluation.inference import make_inference_fn, multi_scale_flip, sliding_window
from jaxseg.evaluation.metrics import (confusion_matrix, format_iou_table, iou_from_confusion,
                                       summarize)

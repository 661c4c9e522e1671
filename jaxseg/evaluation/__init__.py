"""Evaluation: confusion matrix, IoU, tables; sliding-window and multi-scale inference;
segmenting your own images (``predict``, ``predict_files``)."""
from jaxseg.evaluation.inference import make_inference_fn, multi_scale_flip, sliding_window
from jaxseg.evaluation.metrics import (confusion_matrix, format_iou_table, iou_from_confusion,
                                       summarize)
from jaxseg.evaluation.segment import predict, predict_files, predict_logits

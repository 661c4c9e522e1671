"""Building blocks of the detection models (Mask R-CNN): FPN backbone, heads, RPN and RoI
target assignment / post-processing, mask pasting. ``jaxseg.models.maskrcnn`` assembles them.
"""

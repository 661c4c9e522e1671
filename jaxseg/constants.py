"""Constants shared across data, losses, models and evaluation."""

# The label of pixels that carry no class: not scored, no loss (the batch contract in
# DESIGN.md; CamVid's void and VOC's boundary are mapped to it by the data builders).
IGNORE_INDEX = 255

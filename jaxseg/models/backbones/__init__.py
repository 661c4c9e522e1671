"""Feature extractors shared by the segmentation heads."""
from jaxseg.models.backbones.vgg import VGG16, vgg16_widths  # noqa: F401

"""Weights from PyTorch checkpoints (torch is never imported)."""
from jaxseg.convert.maskrcnn import maskrcnn_from_torch, maskrcnn_state_dict  # noqa: F401
from jaxseg.convert.torch import from_torch_state_dict, vgg16_state_dict  # noqa: F401
from jaxseg.convert.torch_file import TorchFileError, load_torch_file  # noqa: F401

"""Models kapify builds on: timm/torchvision adaptations (small-image stem, pixel-space input) and
the small convnets of the paper's §4.2 studies."""

from .adapt import ADAPTATIONS, adapt, normalize_input, register_adaptation, small_image_stem
from .factory import MODELS, build_from_source, create_model
from .small_convnet import SmallConvNet, small_convnet

__all__ = [
    "ADAPTATIONS",
    "MODELS",
    "SmallConvNet",
    "adapt",
    "build_from_source",
    "create_model",
    "normalize_input",
    "register_adaptation",
    "small_convnet",
    "small_image_stem",
]

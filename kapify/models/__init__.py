"""Models kapify builds on: timm/torchvision adaptations (small-image stem, pixel-space input) and
the small convnets of the paper's §4.2 studies."""

from .adapt import ADAPTATIONS, adapt, normalize_input, register_adaptation, small_image_stem
from .small_convnet import SmallConvNet, small_convnet

#: kapify's own architectures, built by ``kapify.create_model("kapify/<name>", **kwargs)``.
MODELS = {
    "small_convnet": small_convnet,  # §4.2: 1-3 conv-BN-ReLU blocks (depth, kernel-size multiplier, sigma studies)
}

__all__ = [
    "ADAPTATIONS",
    "MODELS",
    "SmallConvNet",
    "adapt",
    "normalize_input",
    "register_adaptation",
    "small_convnet",
    "small_image_stem",
]

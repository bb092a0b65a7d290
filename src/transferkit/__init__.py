"""transferkit: a folder of labelled images to a good image classifier on a CPU, the
transfer-learning way (pretrained backbone, frozen, new head, then fine-tuned)."""

__version__ = "0.1.0"

from .backbones import available_backbones, create_backbone, list_layers, register_weights  # noqa: E402
from .predict import Classifier, load  # noqa: E402
from .train import TrainConfig, train  # noqa: E402

__all__ = ["Classifier", "TrainConfig", "available_backbones", "create_backbone", "list_layers",
           "load", "register_weights", "train", "__version__"]

"""transferkit: a folder of labelled images to a good image classifier on a CPU, the
transfer-learning way (pretrained backbone, frozen, new head, then fine-tuned).

The public names are imported on first use, so that `import transferkit` stays light (no torch
until a model is needed)."""

from importlib import import_module, metadata

try:
    __version__ = metadata.version("transferkit")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "unknown"

_PUBLIC = {
    "TrainConfig": "config", "TransferkitError": "errors", "train": "search", "load": "run",
    "load_engine": "run", "Classifier": "classifier", "available_backbones": "sources",
    "register_weights": "sources", "WeightSource": "sources", "create_backbone": "backbones",
    "list_layers": "adapters", "suggest": "active", "find_label_issues": "active",
    "cross_val_accuracy": "active",
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'transferkit' has no attribute {name!r}")

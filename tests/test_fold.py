"""BatchNorm folded into convolutions for inference: the same numbers, the trained model untouched,
and only the pairs that fold exactly."""

from __future__ import annotations

import numpy as np
import torch
from test_keras import FIXTURE, TOLERANCE, fixture_images
from timm.layers import BatchNormAct2d, StdConv2d
from torch import nn

from transferkit.models.backbones import create_backbone
from transferkit.models.fold import conv_norm_pairs, fold_batchnorm
from transferkit.models.transfer import TransferModel


def features(model: TransferModel, backbone: nn.Module | None = None) -> np.ndarray:
    with torch.inference_mode():
        return model.features(model.normalize(fixture_images()), backbone).numpy()


def test_folded_lite0_has_no_batchnorm_left_and_computes_the_same_features():
    made = create_backbone("tf_efficientnet_lite0")
    model = TransferModel(made.model, 2, made.preprocess).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model.backbone)
    assert folded is not model.backbone
    assert len(conv_norm_pairs(model.backbone)) == 49  # every BatchNorm of Lite0 follows a convolution
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    plain, fast = features(model), features(model, folded)
    assert np.abs(plain - fast).max() < 1e-4 * np.abs(plain).max()
    # the model that trains and saves is untouched: same weights, BatchNorm still there, still trainable
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.unfreeze_from(0)
    assert all(p.requires_grad for p in model.backbone.parameters())
    assert not any(p.requires_grad for p in folded.parameters())


def test_folded_keras_mobilenetv2_still_reproduces_keras():
    made = create_backbone("mobilenetv2_100")  # Conv2dSame ("same" padding) and Keras's epsilon
    model = TransferModel(made.model, 2, made.preprocess).eval()
    folded = fold_batchnorm(model.backbone)
    assert len(conv_norm_pairs(model.backbone)) == 52
    assert np.abs(features(model, folded) - np.load(FIXTURE / "features.npy")).max() < TOLERANCE


class Residual(nn.Module):
    """A convolution whose output is also read before its norm: folding would change that read."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def randomised(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so that a wrong fold shows."""
    generator = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=generator) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=generator) - 0.5)
    return model.eval()


def test_only_exact_folds_are_made():
    plain = randomised(nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=nn.ReLU)))
    standardised = randomised(nn.Sequential(StdConv2d(3, 4, 3), nn.BatchNorm2d(4)))  # reweights in forward
    residual, batch_stats = randomised(Residual()), nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    batch_stats[1].track_running_stats, batch_stats[1].running_mean, batch_stats[1].running_var = False, None, None
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert conv_norm_pairs(plain) == [("0", "1")]
    folded = fold_batchnorm(plain)
    assert isinstance(folded[1], nn.Sequential) and isinstance(folded[1][-1], nn.ReLU)  # the activation stays
    assert torch.allclose(folded(x), plain(x), atol=1e-5)
    for model in (standardised, residual, batch_stats.eval()):
        assert conv_norm_pairs(model) == [] and fold_batchnorm(model) is model


def test_a_model_without_batchnorm_or_that_cannot_be_traced_runs_as_it_is():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x  # data-dependent: fx cannot trace it

    no_norm = nn.Sequential(nn.Conv2d(3, 3, 1), nn.LayerNorm(3))
    assert fold_batchnorm(no_norm) is no_norm
    untraceable = Untraceable()
    assert conv_norm_pairs(untraceable) == [] and fold_batchnorm(untraceable) is untraceable


def test_extraction_through_the_folded_backbone_stores_the_same_views(lfw_data):
    from transferkit.training.cache import cut_index, extract, feature_chain

    made = create_backbone("tf_efficientnet_lite0", image_size=64)
    model = TransferModel(made.model, 2, made.preprocess, rotation=0.05).eval()
    folded = fold_batchnorm(model.backbone)
    chains = feature_chain(model.backbone), feature_chain(folded)
    cut = cut_index(chains[0], model.layers[78][0])
    common = dict(images=lfw_data.images[:16], views=2, cut=cut, batch_size=8, device=torch.device("cpu"),
                  dtype=np.float32)
    (pooled, boundary), (fast_pooled, fast_boundary) = (
        extract(model, chain=chain, backbone=backbone, **common)
        for chain, backbone in zip(chains, (model.backbone, folded)))
    assert pooled.shape == fast_pooled.shape == (2, 16, 1280) and boundary.shape == fast_boundary.shape
    for plain, fast in ((pooled, fast_pooled), (boundary, fast_boundary)):  # augmented views too
        assert np.abs(plain - fast).max() < 1e-4 * np.abs(plain).max()

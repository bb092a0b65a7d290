"""The seed's freezing rules, the head, the loss/accuracy conventions and augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SIZE

from transferkit.models.backbones import create_backbone, is_batchnorm
from transferkit.models.transfer import Augment, TransferModel
from transferkit.predict.metrics import predict_labels
from transferkit.training.cache import Views
from transferkit.training.trainer import train_epoch
from transferkit.utils.progress import Reporter


def make_model(train_bn=False, classes=2) -> TransferModel:
    backbone = create_backbone(image_size=SIZE)
    return TransferModel(backbone.model, classes, backbone.preprocess, train_bn=train_bn)


def snapshot(model: TransferModel) -> list[dict[str, torch.Tensor]]:
    """Per backbone layer: its own parameters and buffers (BN running statistics included)."""
    return [{k: v.detach().clone() for k, v in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]}
            for _, m in model.layers]


def run_epoch(model, data, lr=1e-3):
    torch.manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    train_epoch(model, Views(data.images[None], data.labels, model), torch.optim.Adam(params, lr), 16, np.random.default_rng(0), "cpu",
                Reporter(live=False, quiet=True))


def test_phase1_backbone_and_bn_statistics_are_bit_identical(lfw_data):
    model = make_model()
    before, head = snapshot(model), model.head.weight.detach().clone()
    assert all(not p.requires_grad for p in model.backbone.parameters())
    run_epoch(model, lfw_data)
    for layer_before, layer_after in zip(before, snapshot(model)):
        for key in layer_before:
            assert torch.equal(layer_before[key], layer_after[key])
    assert not torch.equal(head, model.head.weight)


@pytest.mark.parametrize("train_bn", [False, True])
def test_phase2_only_layers_from_fine_tune_at_change(lfw_data, train_bn):
    model = make_model(train_bn=train_bn)
    k = 78
    model.unfreeze_from(k)
    before = snapshot(model)
    run_epoch(model, lfw_data, lr=1e-4)
    after = snapshot(model)
    for i, ((name, module), b, a) in enumerate(zip(model.layers, before, after)):
        for key in b:
            same = torch.equal(b[key], a[key])
            is_stat = key in ("running_mean", "running_var", "num_batches_tracked")
            if i < k:
                assert same, f"frozen layer {i} {name}.{key} changed"
            elif is_stat:
                assert same != (train_bn and is_batchnorm(module)), f"{name}.{key}"
            else:
                assert not same, f"unfrozen layer {i} {name}.{key} did not change"


def test_backbone_runs_in_inference_mode_while_training():
    model = make_model().train()
    assert model.training and model.head.training and model.dropout.training
    assert not any(m.training for m in model.backbone.modules())
    model = make_model(train_bn=True)
    model.unfreeze_from(90)
    model.train()
    training_bn = [i for i, (_, m) in enumerate(model.layers) if m.training]
    assert training_bn and min(training_bn) >= 90 and all(is_batchnorm(model.layers[i][1]) for i in training_bn)


def test_head_shape_loss_and_probabilities():
    binary, multi = make_model(), make_model(classes=4)
    assert binary.head.out_features == 1 and multi.head.out_features == 4
    logits = torch.tensor([[0.2], [-1.0]])
    target = torch.tensor([1, 0])
    expected = -(np.log(1 / (1 + np.exp(-0.2))) + np.log(1 - 1 / (1 + np.exp(1.0)))) / 2
    assert binary.loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    probs = binary.probabilities(logits)
    assert torch.allclose(probs.sum(1), torch.ones(2))
    # p = sigmoid(0.2) = 0.55 is class 1: accuracy thresholds the probability, not the logit.
    assert predict_labels(probs.numpy()).tolist() == [1, 0]
    four = torch.tensor([[0.1, 2.0, 0.3, -1.0]])
    assert multi.loss(four, torch.tensor([1])).item() == pytest.approx(
        torch.nn.functional.cross_entropy(four, torch.tensor([1])).item())
    assert predict_labels(multi.probabilities(four).numpy()).tolist() == [1]


def test_augmentation_only_in_training_and_as_configured():
    x = torch.rand(64, 3, 16, 16)
    aug = Augment(flip=True, rotation=0.0).train()
    torch.manual_seed(0)
    out = aug(x)
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54
    assert torch.equal(Augment(True, 0.2).eval()(x), x)
    assert torch.equal(Augment(False, 0.0).train()(x), x)
    # A quarter-turn-symmetric check of the rotation range: a one-pixel dot at the centre-right
    # rotates by at most 0.2 of a turn (72 degrees), so it never reaches the left half.
    dot = torch.zeros(200, 1, 33, 33)
    dot[:, :, 16, 28] = 1.0
    torch.manual_seed(1)
    rotated = Augment(flip=False, rotation=0.2).train()(dot)
    ys, xs = np.unravel_index(rotated[:, 0].flatten(1).argmax(1).numpy(), (33, 33))
    angles = np.degrees(np.arctan2(16 - ys, xs - 16))
    assert np.abs(angles).max() <= 75 and np.abs(angles).max() > 55 and xs.min() >= 16

"""The cached pipeline computes what the seed's plain loop computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SIZE

from transferkit.cfg.settings import TrainConfig
from transferkit.models.backbones import create_backbone
from transferkit.models.transfer import TransferModel
from transferkit.training.cache import SuffixForward, cut_index, feature_chain, run_chain
from transferkit.training.recipe import fit
from transferkit.utils.progress import Reporter
from transferkit.utils.runtime import seed_everything


def model_and_config(**overrides):
    backbone = create_backbone(image_size=SIZE)
    config = TrainConfig(image_size=SIZE, batch_size=16, **overrides)
    model = TransferModel(backbone.model, 2, backbone.preprocess, config.dropout, config.flip,
                          config.rotation, config.train_bn)
    return model.to(memory_format=torch.channels_last), config


@pytest.mark.parametrize("fine_tune_epochs", [0, 2])
def test_cached_and_plain_loops_give_the_same_weights_without_augmentation(lfw_data, fine_tune_epochs, monkeypatch):
    # The arithmetic of caching alone: extraction through the model's own layers, as the plain loop
    # runs them. (Folded BatchNorm changes the stored inputs by float rounding, ~1e-6 relative, which
    # Adam's normalised steps amplify on weights whose gradient is near zero; test_fold checks it.)
    monkeypatch.setattr("transferkit.training.cache.fold_batchnorm", lambda backbone: backbone)
    train, val = lfw_data.subset(np.arange(0, 48, 2)), lfw_data.subset(np.arange(1, 48, 2))
    results = []
    for cache in (False, True):
        seed_everything(0)
        model, config = model_and_config(flip=False, rotation=0.0, cache=cache, epochs=3,
                                         fine_tune_epochs=fine_tune_epochs, cache_dtype="float32", bf16=False,
                                         monitor="val_accuracy", threads=1)  # fixed: free cores vary
        history = fit(model, train, val, config, 78, Reporter(live=False, quiet=True), torch.device("cpu")).history
        results.append((model.state_dict(), [r["train_loss"] for r in history]))
    (plain, plain_loss), (cached, cached_loss) = results
    assert np.allclose(plain_loss, cached_loss, rtol=1e-4)
    for key in plain:  # Adam's step follows the gradient's sign: 1.2e-5 measured after 2 phase-2 epochs
        assert torch.allclose(plain[key], cached[key], atol=3e-5), key


@pytest.mark.parametrize("storage", [torch.float32, torch.float16])
def test_suffix_from_cached_boundary_has_the_full_models_gradients(lfw_data, storage):
    model, _ = model_and_config()
    model.unfreeze_from(78)
    model.eval()  # dropout off so both passes see the same network
    chain = feature_chain(model.backbone)
    cut = cut_index(chain, model.layers[78][0])
    assert chain[cut][0] == "blocks.5.2"
    x = torch.from_numpy(lfw_data.images[:8]).permute(0, 3, 1, 2)
    y = torch.from_numpy(lfw_data.labels[:8])
    grads = []
    for cached in (False, True):
        model.zero_grad()
        if cached:
            with torch.no_grad():
                boundary = run_chain(chain[:cut], model.normalize(x)).to(storage).float()
            logits = SuffixForward(model, chain, cut)(boundary)
        else:
            logits = model(x)
        model.loss(logits, y).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) > 10
    for name in grads[0]:
        full, suffix = grads[0][name].flatten(), grads[1][name].flatten()
        if storage == torch.float32:  # the same numbers, up to float rounding
            assert (full - suffix).abs().max() <= 1e-4 * full.abs().max() + 1e-9, name
        else:  # float16 storage rounds the boundary: the same direction, within 1 %
            assert torch.nn.functional.cosine_similarity(full, suffix, dim=0) > 0.999, name
            assert (full.norm() / suffix.norm() - 1).abs() < 0.01, name


def test_chain_reproduces_forward_features_or_declines():
    assert feature_chain(create_backbone("resnet18", weights="random").model) is not None
    assert feature_chain(create_backbone("mobilenetv3_small_100", weights="random").model) is not None
    assert feature_chain(create_backbone("vit_tiny_patch16_224", weights="random").model) is None


@pytest.mark.slow  # trains several runs
def test_views_are_reused_across_runs_with_identical_results(lfw_split, tmp_path):
    import transferkit
    from transferkit.training.cache import FeatureStore

    settings = dict(image_size=SIZE, epochs=2, fine_tune_epochs=1, batch_size=16, bf16=True,
                    cache_dir=str(tmp_path / "cache"))
    first = transferkit.train(lfw_split[0], tmp_path / "a", **settings)
    files = sorted((tmp_path / "cache").glob("*/*.npz"))
    assert len(files) == 3 * 112 + 28  # clean + 2 augmented views per training image, 1 per val
    assert len(list((tmp_path / "cache").iterdir())) == 2  # bfloat16 training views, float32 validation
    messages = []
    again = transferkit.train(lfw_split[0], tmp_path / "c", reporter=Reporter(live=False, log=messages.append),
                              **settings)
    assert any(m.startswith("Extracted 0 views") and "reused 364" in m for m in messages), messages
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[key]), key
    # other head settings reuse the views; a corrupted entry is a miss, recomputed, never an error
    files[0].write_bytes(b"garbage")
    messages.clear()
    transferkit.train(lfw_split[0], tmp_path / "b", reporter=Reporter(live=False, log=messages.append),
                      **{**settings, "lr": 2e-3})
    assert any(m.startswith("Extracted 1 views") and "reused 363" in m for m in messages), messages
    # other augmentation settings are other views: a new folder, nothing reused wrongly
    transferkit.train(lfw_split[0], tmp_path / "d", **{**settings, "rotation": 0.1})
    assert len(list((tmp_path / "cache").iterdir())) == 4
    store = FeatureStore(tmp_path / "cache", {"any": 1}, cap_bytes=0)
    assert store.trim() > 0 and not list((tmp_path / "cache").glob("*/*.npz"))


def test_cache_spills_to_disk_past_its_memory_budget(lfw_data):
    train, val = lfw_data.subset(np.arange(0, 48, 2)), lfw_data.subset(np.arange(1, 48, 2))
    messages = []
    seed_everything(0)
    model, config = model_and_config(epochs=1, fine_tune_epochs=1, cache_memory_gb=1e-6)
    fit(model, train, val, config, 78, Reporter(live=False, log=messages.append), torch.device("cpu"))
    assert any("over the" in m and "memmap" in m for m in messages), messages


@pytest.mark.parametrize("keep", [False, True])
def test_a_run_over_its_memory_budget_spills_and_cleans_up(lfw_split, tmp_path, keep):
    import transferkit

    clf = transferkit.train(lfw_split[0], tmp_path / "run", image_size=SIZE, epochs=2, fine_tune_epochs=1,
                            cache_memory_gb=1e-6, keep_cache=keep, cache_dir="")
    spilled = sorted((tmp_path / "run" / "cache").glob("*.bin")) if keep else []
    assert (tmp_path / "run" / "cache").exists() == keep
    if keep:  # decoded images, train and validation boundary activations and features
        assert len(spilled) >= 5
    assert clf.evaluate(lfw_split[1])["accuracy"] >= 0.8


def test_bf16_extraction_stays_close_to_float32(lfw_data):
    from transferkit.training.cache import extract

    model, _ = model_and_config()
    chain = feature_chain(model.backbone)
    cut = cut_index(chain, "blocks.4.0.conv_pw")
    runs = [extract(model, lfw_data.images[:16], 1, cut, chain, 16, torch.device("cpu"), autocast=a)
            for a in (False, True)]
    (f32, b32), (f16, b16) = runs
    cos = torch.nn.functional.cosine_similarity(torch.from_numpy(f32[0]), torch.from_numpy(f16[0]), dim=1)
    assert cos.min() > 0.98 and b32.shape == b16.shape == (1, 16, 80, 4, 4)


def test_unsplittable_backbone_caches_phase1_and_says_phase2_runs_plain(lfw_split, tmp_path):
    import transferkit

    messages = []
    clf = transferkit.train(lfw_split[0], tmp_path / "run", backbone="convnext_atto", weights="random",
                            image_size=SIZE, epochs=1, fine_tune_epochs=1, batch_size=16, cache_dir="",
                            reporter=Reporter(live=False, log=messages.append))
    assert any("Phase 2 runs the full model each epoch: ConvNeXt cannot be split" in m for m in messages)
    assert any(m.startswith("Cache: 3 view(s)") for m in messages)
    assert clf.meta["weights"].startswith("random") and clf.meta["fine_tune_at"]["index"] > 0

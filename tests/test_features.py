"""Feature extraction: shapes agree with the classifier's own forward, for four timm families."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CLASSIFIERS, make_extractor

from featinv.errors import FeatInvError
from featinv.features import FeatureExtractor, FeatureSpec, pool_and_tile

FAMILIES = list(TINY_CLASSIFIERS)


def images(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_features_match_the_classifiers_own_forward(family):
    extractor = make_extractor(family)
    x = images()
    features = extractor(x)
    own = extractor.classifier.forward_features(extractor.preprocess(x))
    if own.ndim == 3:  # ViT tokens: drop prefix tokens, lay out on the patch grid
        grid = extractor.classifier.patch_embed.grid_size
        own = own[:, extractor.classifier.num_prefix_tokens :].transpose(1, 2).reshape(2, -1, *grid)
    elif family == "swin":  # channels last
        own = own.permute(0, 3, 1, 2)
    assert features.shape == own.shape
    torch.testing.assert_close(features, own)
    assert extractor.spec.shape == tuple(features.shape[1:])


@pytest.mark.parametrize("family", FAMILIES)
def test_feature_index_matches_timm_intermediates(family):
    extractor = make_extractor(family, layer=1)
    x = images()
    features = extractor(x)
    reference = extractor.classifier.forward_intermediates(
        extractor.preprocess(x), indices=[1], intermediates_only=True
    )[0]
    torch.testing.assert_close(features, reference)
    info = extractor.classifier.feature_info
    assert features.shape[1] == info.channels()[1] if hasattr(info, "channels") else info[1]["num_chs"]
    reduction = info[1]["reduction"]
    assert features.shape[-1] == 32 // reduction


def test_module_path_layer_is_hooked_and_stops_early():
    extractor = make_extractor("resnet", layer="layer2")
    x = images()
    classifier = extractor.classifier
    expected = classifier.layer2(
        classifier.layer1(
            classifier.maxpool(classifier.act1(classifier.bn1(classifier.conv1(extractor.preprocess(x)))))
        )
    )
    torch.testing.assert_close(extractor(x), expected)
    assert extractor.spec.layer == "layer2"
    assert extractor.spec.channels == 128
    # The hook only acts inside feature extraction: the full forward still gives logits.
    assert extractor.logits(x).shape == (2, 10)


def test_pooled_mode_tiles_the_global_average():
    spatial = make_extractor("convnext", layer=1)
    pooled = make_extractor("convnext", layer=1, mode="pooled")
    x = images()
    s, p = spatial(x), pooled(x)
    assert p.shape == s.shape
    torch.testing.assert_close(p, s.mean(dim=(2, 3), keepdim=True).expand_as(s))
    torch.testing.assert_close(pool_and_tile(s), p)
    assert pooled.spec.mode == "pooled"


def test_logits_and_preprocessing_use_the_classifiers_data_config():
    extractor = make_extractor("resnet")
    x = torch.rand(1, 3, 48, 40)
    normalized = extractor.preprocess(x)
    assert normalized.shape == (1, 3, 32, 32)
    assert extractor.logits(x).shape == (1, 10)
    assert extractor.spec.mean == pytest.approx((0.485, 0.456, 0.406))


def test_spec_round_trips_through_a_dict():
    spec = make_extractor("vit").spec
    assert FeatureSpec.from_dict(spec.to_dict()) == spec
    assert "vit_tiny_patch16_224" in spec.describe()


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(FeatInvError, match="unknown timm model 'resnet181'.*resnet18"):
        FeatureExtractor("resnet181")


def test_unknown_layer_lists_valid_layers():
    name, kwargs, size = TINY_CLASSIFIERS["resnet"]
    with pytest.raises(FeatInvError, match="unknown layer 'layer9'.*valid layers: forward_features.*layer4"):
        FeatureExtractor(name, "layer9", model_kwargs=kwargs, input_size=size)
    with pytest.raises(FeatInvError, match="layer index 17 is out of range"):
        FeatureExtractor(name, 17, model_kwargs=kwargs, input_size=size)


def test_bad_images_are_rejected():
    extractor = make_extractor("resnet")
    with pytest.raises(FeatInvError, match=r"shape \(B, 3, H, W\)"):
        extractor(torch.rand(3, 32, 32))
    with pytest.raises(FeatInvError, match="NaN or Inf"):
        extractor(torch.full((1, 3, 32, 32), float("nan")))
    with pytest.raises(FeatInvError, match=r"values in \[0, 1\]"):
        extractor(torch.full((1, 3, 32, 32), 255.0))


def test_local_weights_file_is_loaded_safely(tmp_path):
    from safetensors.torch import save_file

    source = make_extractor("resnet")
    state = {k: v.clone() + 0.5 for k, v in source.classifier.state_dict().items() if v.is_floating_point()}
    state.update({k: v for k, v in source.classifier.state_dict().items() if not v.is_floating_point()})
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pth")
    name, kwargs, size = TINY_CLASSIFIERS["resnet"]
    for file in ("w.safetensors", "w.pth"):
        loaded = FeatureExtractor(name, weights=tmp_path / file, model_kwargs=kwargs, input_size=size)
        torch.testing.assert_close(loaded.classifier.conv1.weight, state["conv1.weight"])
    save_file({"nope": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(FeatInvError, match="do not fit"):
        FeatureExtractor(name, weights=tmp_path / "bad.safetensors", model_kwargs=kwargs, input_size=size)

"""The model bundle: save_pretrained -> from_pretrained round-trips exactly, with no pickle files,
and broken folders are reported clearly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_extractor, make_model

from featinv import FeatInvModel, Reconstructor
from featinv.errors import FeatInvError
from featinv.models import FeatInvControlNet

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def reconstruct(model, features):
    return Reconstructor(model).reconstruct(features=features, steps=8, seed=5, progress=False).images


@pytest.fixture
def saved(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "model")
    return tmp_path / "model", tiny_model


def test_round_trip_is_bit_identical_and_pickle_free(saved):
    path, model = saved
    features = torch.rand(2, *model.feature_spec.shape, generator=torch.Generator().manual_seed(0))
    loaded = FeatInvModel.from_pretrained(path)
    assert torch.equal(reconstruct(model, features), reconstruct(loaded, features))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    files = [p for p in path.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in PICKLE_SUFFIXES]
    assert {p.name for p in files} >= {"featinv.json", "contexts.safetensors", "classifier.safetensors"}
    assert loaded.feature_spec == model.feature_spec
    assert loaded.classifier is not None


def test_saving_over_an_existing_model_replaces_it(saved):
    path, model = saved
    other = make_model(seed=7)
    other.save_pretrained(path)
    loaded = FeatInvModel.from_pretrained(path)
    assert torch.equal(loaded.context, other.context)
    assert not any(p.name.startswith(".") for p in path.parent.iterdir())


def test_latent_preset_with_vae_round_trips(tmp_path):
    extractor = make_extractor("convnext", layer=2)
    vae = {
        "block_out_channels": (8, 8),
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "layers_per_block": 1,
        "norm_num_groups": 4,
    }
    model = FeatInvModel.from_preset(
        "minisd",
        extractor,
        block_out_channels=(8, 16, 16, 16),
        norm_num_groups=4,
        cross_attention_dim=16,
        attention_head_dim=4,
        layers_per_block=1,
        image_size=32,
        hint_channels=8,
        context_length=3,
        vae=vae,
    )
    assert model.latent_shape == (4, 16, 16)
    assert model.image_size == (32, 32)
    model.save_pretrained(tmp_path / "m")
    loaded = FeatInvModel.from_pretrained(tmp_path / "m")
    features = torch.rand(1, *model.feature_spec.shape)
    images = reconstruct(loaded, features)
    assert images.shape == (1, 3, 32, 32)
    assert torch.equal(images, reconstruct(model, features))


def test_controlnet_copies_the_base_encoder(tiny_model):
    fresh = FeatInvControlNet.from_unet(tiny_model.unet, tiny_model.feature_spec.channels, hint_channels=16)
    torch.testing.assert_close(fresh.controlnet.conv_in.weight, tiny_model.unet.conv_in.weight)
    torch.testing.assert_close(
        fresh.controlnet.down_blocks[0].resnets[0].conv1.weight, tiny_model.unet.down_blocks[0].resnets[0].conv1.weight
    )
    assert torch.count_nonzero(fresh.hint_encoder.conv_out.weight) == 0


def test_missing_folder(tmp_path):
    with pytest.raises(FeatInvError, match="model folder not found"):
        FeatInvModel.from_pretrained(tmp_path / "nope")


def test_truncated_safetensors(saved):
    path, _ = saved
    weights = path / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(FeatInvError, match="unet weights .* is not a valid safetensors file"):
        FeatInvModel.from_pretrained(path)


def test_garbage_safetensors(saved):
    path, _ = saved
    (path / "contexts.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(FeatInvError, match="contexts file .* is not a valid safetensors file"):
        FeatInvModel.from_pretrained(path)


def test_bad_config(saved):
    path, _ = saved
    (path / "featinv.json").write_text("{not json")
    with pytest.raises(FeatInvError, match="not valid JSON"):
        FeatInvModel.from_pretrained(path)
    (path / "featinv.json").write_text(json.dumps({"format_version": 99, "feature_spec": {}, "noise_schedule": {}}))
    with pytest.raises(FeatInvError, match="format_version 99"):
        FeatInvModel.from_pretrained(path)


def test_model_refuses_a_classifier_of_another_spec(tiny_model):
    other = make_extractor("convnext", layer=2)
    with pytest.raises(FeatInvError, match="trained for resnet18 layer 'layer3'.*convnext_atto"):
        Reconstructor(tiny_model, extractor=other)


def test_a_reloaded_model_saves_without_its_source_path(tmp_path, tiny_model):
    from featinv.models import FeatInvModel

    tiny_model.save_pretrained(tmp_path / "a")
    FeatInvModel.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")
    for part in ("unet", "controlnet"):
        assert "_name_or_path" not in (tmp_path / "b" / part / "config.json").read_text()
    again = FeatInvModel.from_pretrained(tmp_path / "b")
    assert again.controlnet.config.hint_channels == tiny_model.controlnet.config.hint_channels


def test_weights_are_written_one_tensor_at_a_time_in_the_safetensors_format(tmp_path):
    """featinv's streaming writer: safetensors' own reader reads every dtype and layout back, a
    dtype casts only the floating-point tensors, and the plain reader gives the same tensors."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from featinv.weights import iter_safetensors, save_state_dict_atomic

    state = {
        "weight": torch.randn(3, 5),
        "transposed": torch.randn(4, 6).t(),  # not contiguous
        "half": torch.randn(2, 2).half(),
        "brain": torch.randn(5).bfloat16(),
        "steps": torch.arange(7),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5),
        "mask": torch.tensor([True, False, True]),
    }
    save_state_dict_atomic(state, tmp_path / "a.safetensors", metadata={"format": "pt"})
    back = load_file(str(tmp_path / "a.safetensors"))
    assert list(back) and all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in state.items())
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    assert all(torch.equal(t, state[k]) for k, t in iter_safetensors(tmp_path / "a.safetensors", list(state)))
    save_state_dict_atomic(state, tmp_path / "b.safetensors", dtype=torch.float16)
    half = load_file(str(tmp_path / "b.safetensors"))
    assert {k: v.dtype for k, v in half.items()} == {
        **dict.fromkeys(("weight", "transposed", "half", "brain", "empty", "scalar"), torch.float16),
        "steps": torch.int64,
        "mask": torch.bool,
    }
    assert torch.equal(half["transposed"], state["transposed"].half())
    save_state_dict_atomic(state, tmp_path / "c.safetensors", dtype=torch.float16)
    assert (tmp_path / "b.safetensors").read_bytes() == (tmp_path / "c.safetensors").read_bytes()

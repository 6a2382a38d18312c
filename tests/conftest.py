"""Shared fixtures: tiny models built from config, seeded, on the CPU. Nothing is downloaded."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():  # Triton kernels run in the interpreter on CPU-only machines
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tiny classifiers of three timm families (and a Swin), built from config.
TINY_CLASSIFIERS = {
    "resnet": ("resnet18", {"num_classes": 10}, (3, 32, 32)),
    "convnext": ("convnext_atto", {"num_classes": 10, "dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1)}, (3, 32, 32)),
    "swin": (
        "swin_tiny_patch4_window7_224",
        {"num_classes": 10, "img_size": 32, "window_size": 4, "embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2)},
        (3, 32, 32),
    ),
    "vit": (
        "vit_tiny_patch16_224",
        {"num_classes": 10, "img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2},
        (3, 32, 32),
    ),
}


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def make_extractor(family: str = "resnet", layer=None, mode: str = "spatial"):
    from featinv.features import FeatureExtractor

    name, kwargs, input_size = TINY_CLASSIFIERS[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return FeatureExtractor(name, layer, mode=mode, model_kwargs=kwargs, input_size=input_size)


def make_model(extractor=None, seed: int = 0, **overrides):
    from featinv.models import FeatInvModel

    extractor = extractor if extractor is not None else make_extractor("resnet", "layer3")
    model = FeatInvModel.from_preset("micro", extractor, seed=seed, **overrides)
    # A trained hint encoder is not zero at its output; give it weights so the condition matters.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        torch.nn.init.normal_(model.controlnet.hint_encoder.conv_out.weight, std=0.05)
        for block in model.controlnet.controlnet.controlnet_down_blocks:
            torch.nn.init.normal_(block.weight, std=0.05)
        torch.nn.init.normal_(model.controlnet.controlnet.controlnet_mid_block.weight, std=0.05)
    return model.eval()


@pytest.fixture
def tiny_extractor():
    return make_extractor("resnet", "layer3")


@pytest.fixture
def tiny_model(tiny_extractor):
    return make_model(tiny_extractor)


@pytest.fixture
def tiny_images():
    generator = torch.Generator().manual_seed(1)
    return torch.rand(3, 3, 32, 32, generator=generator)

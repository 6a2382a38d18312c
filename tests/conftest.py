"""Shared fixtures: tiny models built from config, seeded, on the CPU. Nothing is downloaded."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `python -m pytest` puts the checkout on sys.path: featinv's import keeps its kernels/ from passing
# for Hugging Face's `kernels`, which transformers imports (before any test module imports it).
import featinv  # noqa: E402, F401

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


# A test that takes HEAVY_SECONDS or more (setup and call, on CI's 2-core CPU) carries
# `@pytest.mark.heavy`: `make check` leaves those out for the edit-test loop, `make test` (and CI)
# runs everything, and a full run fails when an unmarked test took that long (pytest_sessionfinish),
# so the marker follows what the tests measure, not a list kept by hand.
HEAVY_SECONDS = float(os.environ.get("FEATINV_HEAVY_SECONDS", "3"))
# One test's time moves by a third from run to run (3.3 s alone, 2.4 s in `make check`, 3.8 s in
# `make test`): mark a test once it has taken two thirds of the limit; those are listed as a warning.
NEAR_HEAVY = 2 / 3
_durations: dict[str, float] = {}  # unmarked tests: seconds of setup and call


def pytest_configure(config):
    config.addinivalue_line("markers", f"heavy: {HEAVY_SECONDS:g} s or more on a 2-core CPU; make check leaves it out")


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


def pytest_runtest_logreport(report):
    if report.when in ("setup", "call") and "heavy" not in report.keywords:
        _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration


def unmarked_heavy_tests(durations: dict[str, float], limit: float = HEAVY_SECONDS) -> list[str]:
    """The lines naming each unmarked test of ``durations`` (node id -> seconds) at ``limit`` or more."""
    slow = sorted(((s, n) for n, s in durations.items() if s >= limit), reverse=True)
    return [f"{seconds:.1f} s  {nodeid}" for seconds, nodeid in slow]


def pytest_sessionfinish(session, exitstatus):
    """Fail a whole-suite run (`make test`, CI: pytest with no paths, the testpaths) in which a test
    without the heavy marker took HEAVY_SECONDS or more."""
    config = session.config
    if config.args_source != pytest.Config.ArgsSource.TESTPATHS or config.option.collectonly:
        return
    if config.option.markexpr or config.option.keyword:  # a selection: `make check`, -k
        return
    slow = unmarked_heavy_tests(_durations)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    near = [line for line in unmarked_heavy_tests(_durations, NEAR_HEAVY * HEAVY_SECONDS) if line not in slow]
    if near and reporter is not None:  # a warning, not a failure: candidates for the marker on a slower machine
        reporter.write_sep("-", f"unmarked tests near {HEAVY_SECONDS:g} s (mark them: a slower run crosses it)")
        for line in near:
            reporter.write_line(line)
    if slow:
        lines = [f"{len(slow)} test(s) took {HEAVY_SECONDS:g} s or more without @pytest.mark.heavy:", *slow]
        if reporter is not None:
            reporter.write_sep("=", "unmarked heavy tests", red=True)
            for line in lines:
                reporter.write_line(line)
        if session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


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


# The CLI tests' model folder and image files, for every test module.
@pytest.fixture
def model_dir(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture
def image_files(tmp_path):
    from PIL import Image

    paths = []
    for i, size in enumerate([(32, 32), (40, 28)]):
        path = tmp_path / f"img{i}.png"
        Image.effect_noise(size, 60 + 20 * i).convert("RGB").save(path)
        paths.append(str(path))
    return paths

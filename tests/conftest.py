"""Shared fixtures: tiny models built from config, seeded, on the CPU. Nothing is downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


# A test that takes HEAVY_SECONDS or more (its call and the setup of its function-scoped fixtures,
# on CI's 2-core CPU; shared fixtures' setup is timed apart, as it is the module's cost) carries
# `@pytest.mark.heavy`: `make check` leaves those out for the edit-test loop, `make test` (and CI)
# runs everything, and a full run fails when an unmarked test took that long (pytest_sessionfinish),
# so the marker follows what the tests measure, not a list kept by hand. A full run's times move by
# up to 2x (1.3 s in `make check`, 2.6 s in one `make test`): a test over the limit is timed once
# more in a pytest process of its own, and the run fails only when it is over the limit there too.
HEAVY_SECONDS = float(os.environ.get("FEATINV_HEAVY_SECONDS", "3"))
# Unmarked tests above two thirds of the limit are listed, as a warning: candidates for the marker.
NEAR_HEAVY = 2 / 3
DURATIONS_FILE = "FEATINV_DURATIONS_FILE"  # where a run writes its unmarked tests' seconds (JSON)
_durations: dict[str, float] = {}  # unmarked tests: their own seconds (pytest_runtest_logreport)


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


_shared_setup: dict[str, float] = {}  # seconds each test spent setting up module, class, session fixtures
_running = {"nodeid": "", "shared fixtures": 0}  # the test being run; shared fixtures being set up


def pytest_runtest_logstart(nodeid, location):
    _running["nodeid"] = nodeid


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    """Time the shared fixtures apart: their setup lands on whichever test needs them first, and
    marking that test heavy would not leave it out of `make check`."""
    shared = fixturedef.scope != "function"
    outermost = shared and _running["shared fixtures"] == 0  # one set up inside another counts once
    start = time.perf_counter()
    _running["shared fixtures"] += shared
    try:
        yield
    finally:
        _running["shared fixtures"] -= shared
        if outermost:
            nodeid = _running["nodeid"]
            _shared_setup[nodeid] = _shared_setup.get(nodeid, 0.0) + time.perf_counter() - start


def pytest_runtest_logreport(report):
    """Each unmarked test's own seconds: its setup, less the shared fixtures', and its call."""
    if report.when in ("setup", "call") and "heavy" not in report.keywords:
        own = report.duration - (_shared_setup.pop(report.nodeid, 0.0) if report.when == "setup" else 0.0)
        _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + max(own, 0.0)


def slowest(durations: dict[str, float], at_least: float, below: float = float("inf")) -> list[tuple[float, str]]:
    """(seconds, node id) of each test of ``durations`` (node id -> seconds) in [at_least, below),
    slowest first."""
    return sorted(((s, n) for n, s in durations.items() if at_least <= s < below), reverse=True)


def recheck_heavy(durations: dict[str, float], time_alone, limit: float = HEAVY_SECONDS) -> tuple[list[str], list[str]]:
    """Time each test of ``durations`` (node id -> seconds) at ``limit`` or more once more with
    ``time_alone(nodeid) -> seconds``: the lines naming those at ``limit`` again (heavy) and those
    under it the second time (noise), slowest first."""
    heavy, noise = [], []
    for seconds, nodeid in slowest(durations, limit):
        again = time_alone(nodeid)
        (heavy if again >= limit else noise).append(f"{seconds:.1f} s, then {again:.1f} s alone  {nodeid}")
    return heavy, noise


def time_alone(nodeid: str, rootdir: Path) -> float:
    """The test ``nodeid``'s own seconds (as in the run) in a pytest process of its own; infinite
    when that run reports no time for it."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "durations.json"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", nodeid]
        env = {**os.environ, DURATIONS_FILE: str(report)}
        subprocess.run(command, cwd=rootdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
        return json.loads(report.read_text()).get(nodeid, float("inf")) if report.exists() else float("inf")


def pytest_sessionfinish(session, exitstatus):
    """Fail a whole-suite run (`make test`, CI: pytest with no paths, the testpaths) in which a test
    without the heavy marker took HEAVY_SECONDS or more, in the run and again alone."""
    config = session.config
    if os.environ.get(DURATIONS_FILE):  # a run of time_alone's
        Path(os.environ[DURATIONS_FILE]).write_text(json.dumps(_durations))
        return
    if config.args_source != pytest.Config.ArgsSource.TESTPATHS or config.option.collectonly:
        return
    if config.option.markexpr or config.option.keyword:  # a selection: `make check`, -k
        return
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    heavy, noise = recheck_heavy(_durations, lambda nodeid: time_alone(nodeid, config.rootpath))
    near = noise + [f"{s:.1f} s  {n}" for s, n in slowest(_durations, NEAR_HEAVY * HEAVY_SECONDS, HEAVY_SECONDS)]
    if near and reporter is not None:  # a warning, not a failure: candidates for the marker
        reporter.write_sep("-", f"unmarked tests near {HEAVY_SECONDS:g} s (mark them: a slower run crosses it)")
        for line in near:
            reporter.write_line(line)
    if heavy:
        title = f"{len(heavy)} test(s) took {HEAVY_SECONDS:g} s or more without @pytest.mark.heavy, twice:"
        if reporter is not None:
            reporter.write_sep("=", "unmarked heavy tests", red=True)
            for line in [title, *heavy]:
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

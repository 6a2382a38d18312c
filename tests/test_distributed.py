"""Multi-process runs on the CPU (gloo), launched with torchrun as a user would: DDP training ends
with the same weights on every rank, and sharded reconstruction writes the same images as one
process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_extractor, make_model
from safetensors.torch import load_file

from featinv.images import load_image

WORKERS = Path(__file__).parent / "workers"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(args: list[str], processes: int, cwd: Path) -> str:
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--master_addr=127.0.0.1"]
        launcher += [f"--master_port={_free_port()}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(launcher + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.heavy
def test_two_process_ddp_training_ends_with_identical_weights(tmp_path):
    _run([str(WORKERS / "ddp_train.py"), str(tmp_path)], 2, tmp_path)
    _run([str(WORKERS / "ddp_train.py"), str(tmp_path)], 1, tmp_path)
    rank0, rank1 = load_file(tmp_path / "rank0-of-2.safetensors"), load_file(tmp_path / "rank1-of-2.safetensors")
    single = load_file(tmp_path / "rank0-of-1.safetensors")
    for name, weight in rank0.items():
        assert torch.equal(weight, rank1[name]), name
        # DDP averages the two halves' gradients: the single-process update on the whole batch.
        torch.testing.assert_close(weight, single[name], rtol=1e-4, atol=1e-5)
    untrained = make_model(make_extractor("resnet", "layer3")).controlnet.state_dict()
    assert not torch.equal(untrained["hint_encoder.conv_out.weight"], rank0["hint_encoder.conv_out.weight"])


@pytest.fixture
def model_dir(tmp_path, tiny_model):
    path = tmp_path / "model"
    tiny_model.save_pretrained(path)
    return path


@pytest.mark.heavy
def test_sharded_reconstruction_over_two_processes_equals_one(tmp_path, model_dir, tiny_images):
    from featinv.images import save_image

    paths = []
    for i in range(5):  # an odd count: the shares are 3 and 2
        paths.append(tmp_path / f"in{i}.png")
        save_image(tiny_images[i % 3].roll(i, dims=-1), paths[-1])
    common = ["-m", "featinv.cli", "reconstruct", "--model", str(model_dir), "--steps", "4", "--quiet"]
    common += ["--device", "cpu", "--batch-size", "1", "--images", *map(str, paths)]
    _run([*common, "--out", str(tmp_path / "one")], 1, tmp_path)
    printed = _run([*common, "--out", str(tmp_path / "two")], 2, tmp_path)
    assert printed.count("wrote 5 reconstructions") == 1  # one report, from the process with the first share
    one, two = sorted((tmp_path / "one").iterdir()), sorted((tmp_path / "two").iterdir())
    assert [p.name for p in one] == [p.name for p in two] == ["grid.png", *(f"in{i}.png" for i in range(5))]
    for a, b in zip(one, two, strict=True):
        assert torch.equal(load_image(a), load_image(b)), a.name
    assert not torch.equal(load_image(one[0]), load_image(one[1]))


@pytest.mark.heavy
def test_the_demo_merges_the_shares_of_two_processes(tmp_path):
    common = ["-m", "featinv.cli", "demo", "--device", "cpu", "--num-images", "6", "--steps", "2"]
    _run([*common, "--out", str(tmp_path / "one")], 1, tmp_path)
    _run([*common, "--out", str(tmp_path / "two")], 2, tmp_path)
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert two["processes"] == 2 and one["processes"] == 1
    for mode in ("spatial", "pooled"):
        for name, value in one[mode].items():
            assert two[mode][name] == pytest.approx(value, abs=1e-4), (mode, name)
            assert two["ci95"][mode][name] == pytest.approx(one["ci95"][mode][name], abs=1e-4), (mode, name)
    assert (tmp_path / "two" / "grid.png").is_file() and not (tmp_path / "one" / "rank1").exists()

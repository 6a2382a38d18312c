"""The CLI: commands write what they say, bad input is one line and exit code 2, nothing partial."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, run_cli
from PIL import Image
from safetensors.torch import save_file


def test_info_prints_the_feature_spec(capsys, model_dir):
    code, out, _ = run_cli(capsys, "info", "--model", model_dir)
    assert code == 0
    assert "resnet18 layer 'layer3' (256x2x2, spatial)" in out


def test_reconstruct_writes_one_png_per_input_and_a_grid(capsys, model_dir, image_files, tmp_path):
    out_dir = tmp_path / "out"
    code, out, _ = run_cli(
        capsys, "reconstruct", "--model", model_dir, "--images", *image_files, "--out", out_dir, "--steps", 3, "--quiet"
    )
    assert code == 0, out
    assert sorted(p.name for p in out_dir.iterdir()) == ["grid.png", "img0.png", "img1.png"]
    assert Image.open(out_dir / "img0.png").size == (16, 16)
    grid = Image.open(out_dir / "grid.png")
    # two columns (original | reconstruction) by two rows of 128-pixel cells with 2-pixel padding
    assert grid.size == (2 * 130 + 2, 2 * 130 + 2)


def test_several_samples_per_input_and_their_spread(capsys, model_dir, image_files, tmp_path):
    from featinv.images import load_image

    common = ["reconstruct", "--model", model_dir, "--images", *image_files, "--steps", 3, "--quiet"]
    code, _, err = run_cli(capsys, *common, "--out", tmp_path / "one")
    assert code == 0, err
    code, printed, err = run_cli(capsys, *common, "--samples", 3, "--out", tmp_path / "three")
    assert code == 0, err
    assert "3 samples each" in printed
    per_input = ["{}.png", "{}_sample1.png", "{}_sample2.png", "{}_spread.png"]
    expected = ["grid.png", *(name.format(stem) for stem in ("img0", "img1") for name in per_input)]
    assert sorted(p.name for p in (tmp_path / "three").iterdir()) == sorted(expected)
    # sample 0 is what one sample gives; the others start from other noise
    first = load_image(tmp_path / "three" / "img0.png")
    assert torch.equal(first, load_image(tmp_path / "one" / "img0.png"))
    assert not torch.equal(first, load_image(tmp_path / "three" / "img0_sample1.png"))
    # grid: original | three samples | spread, two rows of 128-pixel cells
    assert Image.open(tmp_path / "three" / "grid.png").size == (5 * 130 + 2, 2 * 130 + 2)
    code, _, err = run_cli(capsys, *common, "--samples", 0, "--out", tmp_path / "zero")
    assert_one_line_error(code, err, "argument --samples: must be an integer in [1, 1000]")
    clash = tmp_path / "img0_sample1.png"
    clash.write_bytes(Path(image_files[0]).read_bytes())
    images = ["--images", *image_files, clash]
    code, _, err = run_cli(
        capsys, "reconstruct", "--model", model_dir, *images, "--samples", 2, "--out", tmp_path / "c"
    )
    assert_one_line_error(code, err, "with --samples 2 two outputs would be named img0_sample1.png")
    assert not (tmp_path / "c").exists()


def test_sample_spread_and_heatmap():
    from featinv.analysis.metrics import sample_spread
    from featinv.images import heatmap

    a, b = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.6)
    assert torch.equal(sample_spread(torch.stack([a, a, a])), torch.zeros(1, 4, 4))
    assert torch.allclose(sample_spread(torch.stack([a, b])), torch.full((1, 4, 4), 0.3))  # |a - b| / 2
    with pytest.raises(ValueError, match="samples must be"):
        sample_spread(a[None])
    colours = heatmap(torch.tensor([[[0.0, 0.25, 0.5, 2.0]]]), high=0.5)
    assert colours.shape == (1, 3, 1, 4)
    brightness = colours.sum(1)[0, 0]
    assert brightness[0] < brightness[1] < brightness[2]  # magma brightens with the value
    assert torch.equal(colours[..., 2], colours[..., 3])  # at and above ``high``: the same colour
    assert float(brightness[0]) < 0.05  # 0 is black


def test_extract_then_reconstruct_from_features(capsys, model_dir, image_files, tmp_path):
    code, _, _ = run_cli(
        capsys, "extract", "--model", model_dir, "--images", *image_files, "--out", tmp_path / "f.safetensors"
    )
    assert code == 0
    code, _, _ = run_cli(
        capsys,
        "reconstruct",
        "--model",
        model_dir,
        "--features",
        tmp_path / "f.safetensors",
        "--out",
        tmp_path / "out",
        "--steps",
        2,
        "--quiet",
    )
    assert code == 0
    assert (tmp_path / "out" / "features_001.png").is_file()


def test_create_makes_a_loadable_model(capsys, tmp_path):
    code, out, err = run_cli(
        capsys,
        "create",
        "--preset",
        "tiny",
        "--classifier",
        "resnet18",
        "--layer",
        "layer4",
        "--classifier-kwargs",
        '{"num_classes": 10}',
        "--input-size",
        "32",
        "--out",
        tmp_path / "new",
    )
    assert code == 0, err
    code, out, _ = run_cli(capsys, "info", "--model", tmp_path / "new")
    assert "resnet18 layer 'layer4' (512x1x1, spatial)" in out


def features_file(tmp_path, tensor):
    path = tmp_path / "bad.safetensors"
    save_file({"features": tensor}, str(path))
    return path


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("missing-model", "model folder not found"),
        ("truncated", "is not a valid safetensors file"),
        ("wrong-channels", "expected (B, 256, 2, 2) for resnet18 layer 'layer3'"),
        ("wrong-size", "expected (B, 256, 2, 2)"),
        ("nan", "contains NaN or Inf"),
        ("not-an-image", "is not a readable image"),
        ("bad-option", "argument --steps: must be an integer in [1, 999], got 'many'"),
        ("bad-steps", "argument --steps: must be an integer in [1, 999]"),
    ],
)
def test_reconstruct_bad_input(capsys, case, pattern, model_dir, image_files, tmp_path):
    out_dir = tmp_path / "out"
    args = ["reconstruct", "--model", model_dir, "--out", out_dir, "--steps", 2, "--quiet"]
    if case == "missing-model":
        args[2] = tmp_path / "missing"
        args += ["--images", *image_files]
    elif case == "truncated":
        weights = model_dir / "controlnet" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        args += ["--images", *image_files]
    elif case == "wrong-channels":
        args += ["--features", features_file(tmp_path, torch.rand(1, 128, 2, 2))]
    elif case == "wrong-size":
        args += ["--features", features_file(tmp_path, torch.rand(1, 256, 4, 4))]
    elif case == "nan":
        args += ["--features", features_file(tmp_path, torch.full((1, 256, 2, 2), float("nan")))]
    elif case == "not-an-image":
        (tmp_path / "notes.png").write_text("this is not an image")
        args += ["--images", image_files[0], tmp_path / "notes.png"]
    elif case == "bad-option":
        args[args.index("--steps") + 1] = "many"
        args += ["--images", *image_files]
    elif case == "bad-steps":
        args[args.index("--steps") + 1] = "0"
        args += ["--images", *image_files]
    code, _, err = run_cli(capsys, *args)  # a usage error too: main returns argparse's code 2
    assert_one_line_error(code, err, pattern)
    assert not out_dir.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize(
    ("classifier", "layer", "pattern"),
    [
        ("resnet181", "layer4", "unknown timm model 'resnet181'; did you mean resnet18"),
        ("resnet18", "layer9", "unknown layer 'layer9' for resnet18; valid layers: forward_features, 0 (act1)"),
    ],
)
def test_create_bad_classifier(capsys, tmp_path, classifier, layer, pattern):
    code, _, err = run_cli(
        capsys,
        "create",
        "--preset",
        "tiny",
        "--classifier",
        classifier,
        "--layer",
        layer,
        "--input-size",
        "32",
        "--out",
        tmp_path / "new",
    )
    assert_one_line_error(code, err, pattern)
    assert not (tmp_path / "new").exists()


@pytest.mark.heavy
def test_entry_point_exit_code_and_help(tmp_path):
    help_run = subprocess.run([sys.executable, "-m", "featinv.cli", "--help"], capture_output=True, text=True)
    assert help_run.returncode == 0
    assert "reconstruct" in help_run.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "featinv.cli", "info", "--model", str(tmp_path / "none")], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"featinv: error: model folder not found: {tmp_path / 'none'}"


def test_outputs_that_cannot_be_written_fail_before_any_work(capsys, model_dir, image_files, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = run_cli(
        capsys, "reconstruct", "--model", model_dir, "--images", *image_files, "--out", blocker / "out"
    )
    assert_one_line_error(code, err, f"--out {blocker / 'out'} cannot be written ({blocker}: ")
    code, _, err = run_cli(capsys, "extract", "--model", model_dir, "--images", *image_files, "--out", tmp_path)
    assert_one_line_error(code, err, f"--out {tmp_path} is a folder: give a file path")
    code, _, err = run_cli(capsys, "reconstruct", "--model", model_dir, "--images", tmp_path, "--out", tmp_path / "o")
    assert_one_line_error(code, err, f"image file {tmp_path} is a folder, not a regular file")
    assert not (tmp_path / "o").exists()


def test_a_system_error_is_one_line_too(capsys, monkeypatch, model_dir):
    import featinv.cli.model

    def denied(args):
        raise PermissionError(13, "Permission denied", "/data/weights.safetensors")

    monkeypatch.setattr(featinv.cli.model, "cmd_info", denied)
    code, _, err = run_cli(capsys, "info", "--model", model_dir)
    assert code == 1
    assert err.strip() == "featinv: error: Permission denied: /data/weights.safetensors"

"""The CLI: commands write what they say, bad input is one line and exit code 2, nothing partial."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from featinv.cli import main


@pytest.fixture
def model_dir(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture
def image_files(tmp_path):
    paths = []
    for i, size in enumerate([(32, 32), (40, 28)]):
        path = tmp_path / f"img{i}.png"
        Image.effect_noise(size, 60 + 20 * i).convert("RGB").save(path)
        paths.append(str(path))
    return paths


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, pattern):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("featinv: error: ")
    assert "Traceback" not in err
    assert pattern in lines[0], lines[0]


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
        ("bad-option", "argument --steps: invalid int value"),
        ("bad-steps", "steps must be an integer in [1, 1000]"),
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
    if case == "bad-option":
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        code, err = exit_info.value.code, capsys.readouterr().err
    else:
        code, _, err = run_cli(capsys, *args)
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
    assert_one_line_error(code, err, f"cannot write the safetensors file {tmp_path}: it is a folder")
    code, _, err = run_cli(capsys, "reconstruct", "--model", model_dir, "--images", tmp_path, "--out", tmp_path / "o")
    assert_one_line_error(code, err, f"image file not found: {tmp_path} (it is a folder)")
    assert not (tmp_path / "o").exists()


def test_a_system_error_is_one_line_too(capsys, monkeypatch, model_dir):
    import featinv.cli

    def denied(args):
        raise PermissionError(13, "Permission denied", "/data/weights.safetensors")

    monkeypatch.setattr(featinv.cli, "cmd_info", denied)
    code, _, err = run_cli(capsys, "info", "--model", model_dir)
    assert code == 1
    assert err.strip() == "featinv: error: Permission denied: /data/weights.safetensors"

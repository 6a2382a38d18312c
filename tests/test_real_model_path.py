"""The real-model path, as a researcher takes it, through the CLI: a (miniature) Stable Diffusion
1.x folder written by diffusers itself, an ImageNet-layout folder of non-square pictures, and
resnet18 at ``layer3``: create -> train in latent space -> resume and extend -> reconstruct (samples,
pooled) -> evaluate -> ONNX export and the onnx backend -> the web app. Then the broken bases a
user meets, each one line and exit code 2 with nothing written."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, run_cli
from sd_miniature import write_image_folder, write_sd_miniature

pytest.importorskip("transformers")

PROMPT = "a photo of the thing"
CLASSIFIER = ["--classifier", "resnet18", "--layer", "layer3", "--input-size", "64"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    write_sd_miniature(root / "sd")
    write_image_folder(root / "images", classes=2, per_class=4, size=(48, 40))
    return root


def _create(capsys, world, out, *extra):
    code, text, err = run_cli(capsys, "create", "--base", world / "sd", *CLASSIFIER, "--out", out, *extra)
    assert code == 0, err
    return text


@pytest.fixture(scope="module")
def trained(world):
    """A model made on the base, trained 2 steps, then resumed and extended to 3 (CLI, one process)."""
    from featinv.cli import main

    model = world / "model"
    assert (
        main(
            [
                "create",
                "--base",
                str(world / "sd"),
                *CLASSIFIER,
                "--image-size",
                "32",
                "--prompt",
                PROMPT,
                "--out",
                str(model),
            ]
        )
        == 0
    )
    common = ["train", "--model", str(model), "--data", str(world / "images"), "--out", str(world / "run")]
    common += ["--batch-size", "2", "--checkpoint-every", "1", "--validate-every", "2", "--validation-steps", "2"]
    assert main([*common, "--steps", "2"]) == 0
    assert main([*common, "--steps", "3", "--resume"]) == 0
    pooled = world / "pooled"
    assert (
        main(
            ["create", "--base", str(world / "sd"), *CLASSIFIER, "--image-size", "32", "--pooled", "--out", str(pooled)]
        )
        == 0
    )
    return world / "run" / "model", pooled


@pytest.mark.heavy
def test_create_reads_the_text_encoder_and_refers_to_the_base(capsys, world, trained):
    from diffusers import StableDiffusionPipeline

    from featinv.models import FeatInvModel
    from featinv.weights import load_state_dict

    model_dir, _ = trained
    made = world / "model"
    assert not (made / "unet").exists() and not (made / "vae").exists()  # a reference, not a copy
    config = json.loads((made / "featinv.json").read_text())
    assert Path(config["base"]["source"]) == (world / "sd").resolve() and config["base"]["relative"] == "../sd"
    assert config["image_size"] == [32, 32] and config["latent_shape"] == [4, 4, 4]
    pipeline = StableDiffusionPipeline.from_pretrained(world / "sd", safety_checker=None)
    positive, negative = pipeline.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt="")
    contexts = load_state_dict(made / "contexts.safetensors")
    torch.testing.assert_close(contexts["context"], positive, rtol=0, atol=1e-6)
    torch.testing.assert_close(contexts["null_context"], negative, rtol=0, atol=1e-6)

    model = FeatInvModel.from_pretrained(model_dir)
    assert model.vae is not None and model.latent_shape == (4, 4, 4) and model.image_size == (32, 32)
    code, out, _ = run_cli(capsys, "info", "--model", model_dir)
    assert code == 0 and "image size:    32x32" in out and "latent shape:  4x4x4" in out and "referred to" in out


def test_training_resumes_extends_and_draws_validation_pictures(world, trained):
    run = world / "run"
    steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert steps[-1] == 3 and 2 in steps
    assert sorted(p.name for p in (run / "validation").iterdir()) == ["step-0000002.png", "step-0000003.png"]
    assert not (run / "model" / "unet").exists()


@pytest.mark.heavy
def test_reconstruct_samples_and_pooled_evaluate_and_onnx(capsys, world, trained):
    model_dir, pooled_dir = trained
    photos = sorted(str(p) for p in (world / "images").rglob("*.png"))[:2]
    out = world / "rec"
    code, text, err = run_cli(
        capsys,
        "reconstruct",
        "--model",
        model_dir,
        "--images",
        *photos,
        "--out",
        out,
        "--steps",
        2,
        "--samples",
        2,
        "--quiet",
    )
    assert code == 0, err
    expected = [f"{stem}{end}.png" for stem in ("000", "001") for end in ("", "_sample1", "_spread")]
    assert sorted(p.name for p in out.iterdir()) == sorted(["grid.png", *expected])
    code, _, err = run_cli(
        capsys,
        "reconstruct",
        "--model",
        pooled_dir,
        "--images",
        *photos,
        "--out",
        world / "rec-pooled",
        "--steps",
        2,
        "--quiet",
    )
    assert code == 0, err

    code, text, err = run_cli(
        capsys,
        "evaluate",
        "--model",
        model_dir,
        "--pooled-model",
        pooled_dir,
        "--data",
        world / "images",
        "--n",
        4,
        "--steps",
        2,
        "--opt-steps",
        2,
        "--out",
        world / "eval",
    )
    assert code == 0, err
    metrics = json.loads((world / "eval" / "metrics.json").read_text())
    assert "featinv spatial" in text and "feature_cosine" in json.dumps(metrics)
    assert "compared at the model's image size 32x32, not the classifier's input 64x64" in text

    code, _, err = run_cli(capsys, "export", "--model", model_dir, "--out", world / "onnx")
    assert code == 0, err
    results = {}
    for backend in ("eager", "onnx"):
        code, _, err = run_cli(
            capsys,
            "reconstruct",
            "--model",
            model_dir,
            "--images",
            photos[0],
            "--out",
            world / backend,
            "--steps",
            2,
            "--backend",
            backend,
            "--engine-dir",
            world / "onnx",
            "--quiet",
        )
        assert code == 0, err
        from featinv.images import load_image

        results[backend] = load_image(world / backend / "000.png")
    assert (results["eager"] - results["onnx"]).abs().max() <= 3 / 255


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.heavy  # above 2 s in a full run: too near the 3 s limit
def test_the_real_time_model_distilled_in_two_stages_on_the_latent_model(capsys, world, trained, tmp_path):
    """Guidance, then trajectory distillation (through the VAE decoder for its consistency term) of
    the layer3 model, then a default reconstruction: 4 dpmpp steps, no guidance."""
    from featinv.models import FeatInvModel

    model_dir, _ = trained
    common = ["train", "--model", model_dir, "--data", world / "images", "--batch-size", 2, "--steps", 1]
    common += ["--distill", "--checkpoint-every", 0]
    code, _, err = run_cli(capsys, *common, "--distill-target", "guidance", "--out", tmp_path / "g")
    assert code == 0, err
    second = ["--distill-target", "trajectory", "--teacher-steps", 2, "--student", tmp_path / "g" / "model"]
    code, _, err = run_cli(capsys, *common, *second, "--consistency-weight", 0.1, "--out", tmp_path / "rt")
    assert code == 0, err
    distilled = FeatInvModel.from_pretrained(tmp_path / "rt" / "model")
    assert distilled.distillation == {"method": "guidance", "guidance_scale": 1.75} and distilled.vae is not None
    photos = sorted(str(p) for p in (world / "images").rglob("*.png"))[:2]
    out = tmp_path / "rec"
    code, _, err = run_cli(
        capsys, "reconstruct", "--model", tmp_path / "rt" / "model", "--images", *photos, "--out", out, "--quiet"
    )
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["000.png", "001.png", "grid.png"]


@pytest.mark.heavy
def test_the_web_app_serves_a_layer3_model(world, trained, tmp_path):
    from helpers import post, upload

    model_dir, pooled_dir = trained
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api/"
    command = [
        sys.executable,
        "-m",
        "featinv.cli",
        "serve",
        "--model",
        str(model_dir),
        "--pooled-model",
        str(pooled_dir),
        "--examples",
        str(world / "images"),
        "--port",
        str(port),
        "--device",
        "cpu",
    ]
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                info = json.load(urllib.request.urlopen(url + "info", timeout=5))
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError((tmp_path / "serve.log").read_text()) from None
                time.sleep(0.2)
        assert info["modes"] == ["spatial", "pooled"] and info["examples"] == 8
        assert not info["steerable"] and "layer3" in info["steer_note"]
        assert info["class_names"][281] == "tabby"  # timm's ImageNet names for a 1000-class classifier
        png = (world / "images" / "n00000001" / "002.png").read_bytes()
        image = upload(url + "upload", png)["id"]
        example = post(url + "example/3", b"", "application/json")["id"]
        for mode in ("spatial", "pooled"):
            query = {"id": image, "other": example, "mix": 0.5, "strength": 0.0, "mode": mode}
            result = post(url + "reconstruct", json.dumps(query).encode(), "application/json")
            assert len(result["images"]) == 3 and result["concept_probability"] is None
            assert all(src.startswith("data:image/png;base64,") for src in result["images"])
        with pytest.raises(urllib.error.HTTPError) as refused:
            post(url + "reconstruct", json.dumps({"id": image, "strength": 1.0}).encode(), "application/json")
        assert refused.value.code == 400 and "steering is off" in json.load(refused.value)["error"]
    finally:
        server.terminate()
        server.wait(10)
        log.close()


# ----- broken bases ------------------------------------------------------------------------------
def _broken(world, tmp_path, name: str) -> Path:
    base = tmp_path / name
    shutil.copytree(world / "sd", base)
    return base


def _rgb_unet_with_a_vae(base: Path) -> None:
    """Replace the UNet with one of 3 input channels: it fits RGB, not the VAE's 4 latent channels."""
    from diffusers import UNet2DConditionModel

    config = json.loads((base / "unet" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")} | {"in_channels": 3, "out_channels": 3}
    shutil.rmtree(base / "unet")
    UNet2DConditionModel(**config).save_pretrained(base / "unet")


BROKEN = {
    "no tokenizer": (lambda b: shutil.rmtree(b / "tokenizer"), "has a text encoder but no tokenizer/ folder"),
    "no vae": (lambda b: shutil.rmtree(b / "vae"), "lists a vae, but"),
    "truncated vae": (
        lambda b: (b / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00" * 8),
        "vae weights",
    ),
    "unet channels": (_rgb_unet_with_a_vae, "in_channels=3, which does not fit the VAE's 4 latent channels"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_base_is_one_line_and_nothing_is_written(capsys, world, tmp_path, case):
    breaks, message = BROKEN[case]
    base = _broken(world, tmp_path, "base")
    breaks(base)
    code, _, err = run_cli(capsys, "create", "--base", base, *CLASSIFIER, "--out", tmp_path / "out")
    assert_one_line_error(code, err, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


@pytest.mark.parametrize(
    ("base", "message"),
    [("no-such-folder", "neither a folder"), ("./missing/base", "neither a folder"), ("a/b/c", "nor a hub id")],
)
def test_a_base_that_is_neither_a_folder_nor_a_hub_id(capsys, tmp_path, monkeypatch, base, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "create", "--base", base, *CLASSIFIER, "--out", tmp_path / "out")
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "out").exists()


def test_a_changed_or_moved_base_is_one_clear_error_and_bundle_copies_it(capsys, world, tmp_path):
    base = _broken(world, tmp_path, "base")
    _create(capsys, world, tmp_path / "bundled", "--bundle")
    assert (tmp_path / "bundled" / "unet").is_dir() and (tmp_path / "bundled" / "vae").is_dir()
    code, _, err = run_cli(capsys, "create", "--base", base, *CLASSIFIER, "--out", tmp_path / "m")
    assert code == 0, err
    from safetensors.torch import load_file, save_file

    weights = base / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    first = next(iter(tensors))
    tensors[first] = tensors[first] + 0.01  # a fine-tuned base is another base
    save_file(tensors, weights)
    code, _, err = run_cli(capsys, "info", "--model", tmp_path / "m")
    assert code == 0  # info reads the folder only
    extract = ["extract", "--model", tmp_path / "m", "--out", tmp_path / "f.safetensors", "--images"]
    extract.append(sorted((world / "images").rglob("*.png"))[0])
    code, _, err = run_cli(capsys, *extract)
    assert_one_line_error(code, err, "is not the one model")
    shutil.rmtree(base)
    code, _, err = run_cli(capsys, *extract)
    assert_one_line_error(code, err, "is not found")
    from featinv.models import FeatInvModel

    assert FeatInvModel.from_pretrained(tmp_path / "bundled").base is None  # self-contained: no base needed


def test_the_shipped_demo_models_share_one_base():
    from featinv.models import FeatInvModel
    from featinv.training.demo_preset import BASE_DIR, POOLED_DIR, PRETRAINED, SPATIAL_DIR

    for name in (SPATIAL_DIR, POOLED_DIR):
        config = json.loads((PRETRAINED / name / "featinv.json").read_text())
        assert config["base"]["relative"] == f"../{BASE_DIR}" and not (PRETRAINED / name / "unet").exists()
    a, b = (FeatInvModel.from_pretrained(PRETRAINED / name) for name in (SPATIAL_DIR, POOLED_DIR))
    assert a.base == b.base == str((PRETRAINED / BASE_DIR).resolve())
    assert torch.equal(a.context, b.context)


def test_a_new_model_on_the_shipped_base_gets_the_context_its_unet_was_trained_with(capsys, tmp_path):
    """shapes-base has no text encoder: a model made on it for another classifier (issue 20's way)
    reads the base's stored contexts instead of drawing a random one the UNet never saw."""
    from featinv.models import FeatInvModel
    from featinv.training.demo_preset import BASE_DIR, PRETRAINED, SPATIAL_DIR

    resnet = ["--classifier", "resnet18", "--input-size", 32, "--classifier-kwargs", '{"num_classes": 6}']
    code, _, err = run_cli(capsys, "create", "--base", PRETRAINED / BASE_DIR, *resnet, "--out", tmp_path / "m")
    assert code == 0, err
    assert "no text encoder" not in err
    made, shipped = (FeatInvModel.from_pretrained(p) for p in (tmp_path / "m", PRETRAINED / SPATIAL_DIR))
    assert torch.equal(made.context, shipped.context) and torch.equal(made.null_context, shipped.null_context)
    assert made.base == shipped.base  # the same base, referred to

"""The published FeatInv: its checkpoint layout converts (``featinv convert``) and featinv then computes
what the official code computed on it, to the last digits (tests/data/official-reference: the
official code's own outputs on a tiny checkpoint in the published layout)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, run_cli
from safetensors.torch import load_file, save_file

from featinv.models import FeatInvModel
from featinv.pipeline import Reconstructor

REFERENCE = Path(__file__).parent / "data" / "official-reference"
CHECKPOINT = REFERENCE / "featinv-official-tiny.ckpt"
# A classifier whose forward_features are 16x5x5, the tiny checkpoint's hint channels and the
# reference's feature maps (the reference gives the maps; only their shape matters here).
CLASSIFIER = ["--classifier", "convnext_atto", "--input-size", "160"]
CLASSIFIER += ["--classifier-kwargs", '{"dims": [8, 8, 8, 16], "depths": [1, 1, 1, 1]}']
TINY = [
    "--config",
    REFERENCE / "cldm_featinv_tiny.yaml",
    "--text-encoder-config",
    REFERENCE / "text_encoder_config.json",
]


def convert(capsys, out: Path, *extra) -> tuple[int, str, str]:
    return run_cli(capsys, "convert", "--checkpoint", CHECKPOINT, *TINY, *CLASSIFIER, "--out", out, *extra)


@pytest.fixture(scope="module")
def reference():
    return load_file(str(REFERENCE / "reference.safetensors")), json.loads((REFERENCE / "reference.json").read_text())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from featinv.cli import main

    out = tmp_path_factory.mktemp("published") / "model"
    args = ["convert", "--checkpoint", CHECKPOINT, *TINY, *CLASSIFIER, "--out", out]
    assert main([str(a) for a in args]) == 0
    return out


@pytest.fixture(scope="module")
def model(converted):
    return FeatInvModel.from_pretrained(converted)


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def test_the_converted_model_guides_on_the_prompt_it_encodes_as_published(model, reference):
    tensors, meta = reference
    assert model.guidance == "prompt" and model.prompt == meta["prompts"]["published"]
    assert max_error(model.context, tensors["context_published"]) <= 1e-5
    assert max_error(model.null_context, tensors["context_empty"]) <= 1e-5
    assert model.latent_shape == (4, 32, 32) and model.image_size == (64, 64)


def test_noise_predictions_match_the_official_apply_model(model, reference):
    tensors, _ = reference
    x, t, features = tensors["x_t"], tensors["t"], tensors["features"]
    prompt, empty = tensors["context_published"].expand(2, -1, -1), tensors["context_empty"].expand(2, -1, -1)
    with torch.no_grad():
        control = model.predict_noise(x, t, prompt, model.controlnet.embed(features))
        zero = model.predict_noise(x, t, empty, model.controlnet.embed(torch.zeros_like(features)))
        base = model.unet(x, t, encoder_hidden_states=empty, return_dict=False)[0]
    assert max_error(control, tensors["eps_control"]) <= 1e-5
    assert max_error(zero, tensors["eps_zero_hint"]) <= 1e-5
    assert max_error(base, tensors["eps_base"]) <= 1e-5


def official_run(reconstructor: Reconstructor, reference):
    tensors, meta = reference
    return reconstructor.reconstruct(
        features=tensors["features"],
        noise=tensors["x_T"],
        steps=meta["ddim_steps"],
        guidance_scale=meta["guidance_scale"],
        sampler="ddim",
        eta=meta["eta"],
        progress=False,
    )


def test_a_whole_ddim_run_reproduces_the_official_images(model, reference):
    tensors, meta = reference
    assert list(model.noise_schedule.ddim(meta["ddim_steps"]).timesteps) == sorted(meta["ddim_timesteps"], reverse=True)
    result = official_run(Reconstructor(model), reference)
    assert max_error(result.samples, tensors["ddim_latents"]) <= 1e-4  # latents up to about 18
    assert max_error(result.images, ((tensors["decoded"] + 1) / 2).clamp(0, 1)) <= 2e-3
    written = (result.images.permute(0, 2, 3, 1) * 255).round()
    assert max_error(written, tensors["images_uint8"]) <= 1  # the script's uint8 rounding
    # featinv's own guidance (zero feature map in the unconditional branch) is another image
    features_mode = Reconstructor(model).reconstruct(
        features=tensors["features"], noise=tensors["x_T"], steps=5, sampler="ddim", guidance="features", progress=False
    )
    assert max_error(features_mode.samples, result.samples) > 1e-3


@pytest.mark.heavy
def test_the_onnx_backend_agrees_with_eager_on_the_published_run(model, reference, tmp_path):
    pytest.importorskip("onnxruntime")
    eager = official_run(Reconstructor(model), reference)
    onnx = official_run(Reconstructor(model, backend="onnx", engine_dir=tmp_path / "onnx"), reference)
    assert max_error(onnx.images, eager.images) <= 1e-3 and max_error(onnx.samples, eager.samples) <= 1e-3


@pytest.mark.slow
def test_the_compiled_backend_agrees_with_eager_on_the_published_run(model, reference):
    """As test_pipeline's compiled test (Inductor on a CPU takes minutes): within fp32 noise."""
    eager = official_run(Reconstructor(model), reference)
    compiled = official_run(Reconstructor(model, backend="compiled"), reference)
    assert max_error(compiled.samples, eager.samples) <= 1e-4


def test_converting_again_gives_byte_identical_weights(capsys, converted, tmp_path):
    code, out, _ = convert(capsys, tmp_path / "again")
    assert code == 0, out
    pairs = [(converted, tmp_path / "again"), (converted.with_name("model-base"), tmp_path / "again-base")]
    for first, second in pairs:
        files = sorted(p.relative_to(first) for p in first.rglob("*.safetensors"))
        assert files and files == sorted(p.relative_to(second) for p in second.rglob("*.safetensors"))
        for name in files:
            assert (first / name).read_bytes() == (second / name).read_bytes(), name
    # the same base again is shared, not written twice
    code, out, _ = convert(capsys, tmp_path / "third", "--base-out", tmp_path / "again-base")
    assert code == 0 and "reused" in out


def test_a_new_model_on_the_converted_base_shares_it_with_no_tokenizer(converted, model):
    from featinv.models.published import PUBLISHED_PROMPT

    base = converted.with_name("model-base")
    new = FeatInvModel.from_base(base, model.classifier or _extractor(), prompt=PUBLISHED_PROMPT)
    assert new.base == str(base) and max_error(new.context, model.context) == 0.0


def _extractor():
    from featinv.features import FeatureExtractor

    return FeatureExtractor("convnext_atto", model_kwargs=json.loads(CLASSIFIER[-1]), input_size=(3, 160, 160))


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    state = torch.load(CHECKPOINT, weights_only=True)["state_dict"]
    wrong = tmp_path / "wrong_keys.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(wrong))
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(CHECKPOINT.read_bytes()[: CHECKPOINT.stat().st_size // 2])
    plain = tmp_path / "plain_controlnet.safetensors"
    renamed = {k.replace("input_hint_block.block.", "input_hint_block."): v for k, v in state.items()}
    save_file(renamed, str(plain))
    return {
        "wrong keys": (wrong, "not a ControlLDM checkpoint"),
        "truncated": (truncated, "truncated or corrupt"),
        "a plain ControlNet": (plain, "no FeatInv hint block"),
        "a folder": (tmp_path, "is a folder"),
    }


class _Payload:
    """Unpickling this would create a file: the refusal must come before."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_bad_files_are_one_line_exit_2_and_nothing_written(capsys, tmp_path):
    for what, (path, message) in _bad_files(tmp_path).items():
        out = tmp_path / f"out-{what.replace(' ', '_')}"
        code, _, err = run_cli(capsys, "convert", "--checkpoint", path, *TINY, *CLASSIFIER, "--out", out)
        assert_one_line_error(code, err, message)
        assert not out.exists() and not out.with_name(out.name + "-base").exists(), what


def test_a_malicious_pickle_runs_nothing(capsys, tmp_path):
    marker, evil = tmp_path / "ran", tmp_path / "evil.ckpt"
    with evil.open("wb") as handle:
        pickle.dump({"state_dict": {"x": torch.zeros(1)}, "payload": _Payload(marker)}, handle, protocol=2)
    code, _, err = run_cli(capsys, "convert", "--checkpoint", evil, *TINY, *CLASSIFIER, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "would import or call code")
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.heavy  # above 2 s in a full run: too near the 3 s limit
def test_a_hint_width_that_does_not_fit_the_classifier_is_refused(capsys, tmp_path):
    # the default classifier (the published ConvNeXt-B, 1024 channels) against the tiny 16-channel hint block
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "convert", "--checkpoint", CHECKPOINT, *TINY, "--out", out)
    assert_one_line_error(code, err, "takes 16-channel feature maps, but the classifier gives 1024")
    assert not out.exists() and not (tmp_path / "out-base").exists()


def test_a_config_that_is_not_controlldm_and_another_prompt_without_tokenizer_are_refused(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  params: {}\n")
    code, _, err = convert(capsys, tmp_path / "a", "--config", config)
    assert_one_line_error(code, err, "not a ControlLDM config")
    code, _, err = convert(capsys, tmp_path / "b", "--prompt", "a photo")
    assert_one_line_error(code, err, "needs a CLIP tokenizer")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("guidance_scale", [1.0, 1.75])
def test_prompt_and_features_guidance_differ_only_when_guidance_is_on(tiny_model, guidance_scale):
    reconstructor = Reconstructor(tiny_model)
    features = torch.randn(2, *tiny_model.feature_spec.shape, generator=torch.Generator().manual_seed(0))
    runs = {
        mode: reconstructor.reconstruct(
            features=features, steps=4, guidance_scale=guidance_scale, guidance=mode, seed=3, progress=False
        ).samples
        for mode in ("features", "prompt")
    }
    if guidance_scale <= 1.0:
        assert torch.equal(runs["features"], runs["prompt"])
    else:
        assert max_error(runs["features"], runs["prompt"]) > 1e-3


def test_guidance_mode_is_stored_shown_and_checked(capsys, tiny_model, tmp_path):
    from featinv.errors import FeatInvError

    tiny_model.guidance = "prompt"
    tiny_model.save_pretrained(tmp_path / "m")
    assert FeatInvModel.from_pretrained(tmp_path / "m").guidance == "prompt"
    code, out, _ = run_cli(capsys, "info", "--model", tmp_path / "m")
    assert code == 0 and "guidance on:   prompt" in out
    with pytest.raises(FeatInvError, match="guidance must be one of features, prompt"):
        Reconstructor(tiny_model).reconstruct(features=torch.zeros(1, *tiny_model.feature_spec.shape), guidance="x")
    config = json.loads((tmp_path / "m" / "featinv.json").read_text())
    (tmp_path / "m" / "featinv.json").write_text(json.dumps({**config, "guidance": "both"}))
    code, _, err = run_cli(capsys, "info", "--model", tmp_path / "m")
    assert_one_line_error(code, err, "guidance must be 'features' or 'prompt'")


@pytest.mark.heavy
def test_the_fast_path_guides_on_the_prompt_as_eager_does(tiny_model):
    """The fast backend's step (run eagerly on the CPU, as test_fast_path's) in each guidance mode."""
    from featinv.engine.fast import FastPath

    features = torch.randn(2, *tiny_model.feature_spec.shape, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, *tiny_model.latent_shape, generator=torch.Generator().manual_seed(2))
    path, schedule = FastPath(tiny_model, compile_mode=None), tiny_model.noise_schedule.ddim(6)
    for mode in ("prompt", "features"):
        want = (
            Reconstructor(tiny_model)
            .reconstruct(features=features, noise=noise, steps=6, guidance=mode, progress=False)
            .samples
        )
        got = path.sample(features, noise, schedule, 1.75, guidance=mode)
        assert max_error(got, want) <= 2e-6 * float(want.abs().max()), mode


def test_reconstruct_on_the_converted_model_through_the_cli(capsys, converted, reference, tmp_path):
    tensors, _ = reference
    save_file({"features": tensors["features"]}, str(tmp_path / "f.safetensors"))
    args = ["reconstruct", "--model", converted, "--features", tmp_path / "f.safetensors", "--steps", 3, "--quiet"]
    code, out, _ = run_cli(capsys, *args, "--guidance-on", "features", "--out", tmp_path / "r")
    assert code == 0 and "wrote 2 reconstructions" in out
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["features_000.png", "features_001.png", "grid.png"]
    code, _, err = run_cli(capsys, *args, "--method", "optimize", "--guidance-on", "prompt", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "--guidance-on applies to --method featinv")


def test_an_fp16_conversion_holds_the_same_weights_on_half_the_disk(capsys, converted, tmp_path):
    """The released checkpoint is fp16: --dtype fp16 loses nothing, and its base loads (float32,
    as diffusers loads any file) with the fingerprint the model recorded."""
    code, out, _ = convert(capsys, tmp_path / "half", "--dtype", "fp16")
    assert code == 0 and "weights in fp16" in out, out
    from safetensors import safe_open

    for folder in (tmp_path / "half" / "controlnet", tmp_path / "half-base" / "unet"):
        with safe_open(str(folder / "diffusion_pytorch_model.safetensors"), framework="pt") as handle:
            assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"F16"}
    sizes = [sum(p.stat().st_size for p in f.rglob("*.safetensors")) for f in (converted, tmp_path / "half")]
    assert sizes[1] < 0.55 * sizes[0]
    half, full = FeatInvModel.from_pretrained(tmp_path / "half"), FeatInvModel.from_pretrained(converted)
    for part in ("unet", "vae", "controlnet"):
        mine, theirs = getattr(half, part).state_dict(), getattr(full, part).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), part


def test_from_single_file_takes_the_tensors_as_stored_or_in_float32():
    from featinv.models.published import read_checkpoint

    state = read_checkpoint(CHECKPOINT)
    assert {v.dtype for v in state.values()} == {torch.float16}
    options = {"config": TINY[1], "text_encoder_config": json.loads(Path(TINY[3]).read_text())}
    stored = FeatInvModel.from_single_file(state, _extractor(), dtype=None, **options)
    weight = stored.unet.conv_in.weight
    assert weight.dtype == torch.float16
    assert weight.data_ptr() == state["model.diffusion_model.input_blocks.0.0.weight"].data_ptr()  # no copy made
    default = FeatInvModel.from_single_file(state, _extractor(), **options)
    assert default.unet.dtype == torch.float32 and torch.equal(default.unet.conv_in.weight, weight.float())


@pytest.mark.parametrize("short", ["memory", "disk"])
def test_memory_or_disk_that_will_not_do_is_one_line_before_anything_is_written(capsys, tmp_path, monkeypatch, short):
    import featinv.resources as resources

    if short == "memory":
        monkeypatch.setattr(resources, "available_memory", lambda: 10**6)
        message = "needs about"
    else:
        monkeypatch.setattr(resources, "free_disk", lambda path: 10**6)
        message = "GB of disk, but the file system of"
    code, _, err = convert(capsys, tmp_path / "out")
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out-base").exists()

"""Export: the ONNX denoiser equals eager, a whole reconstruction through onnxruntime equals the
eager one, the TensorRT engine cache keys and manifests behave, and a missing TensorRT is one line."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from helpers import assert_one_line_error, run_cli

from featinv.engine import make_denoiser
from featinv.engine.export import DENOISER_FILE, HINT_FILE, export_onnx, read_manifest
from featinv.engine.tensorrt import EngineCache, EngineKey
from featinv.errors import FeatInvError
from featinv.pipeline import Reconstructor

pytest.importorskip("onnxruntime")
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture
def exported(tmp_path, tiny_model):
    export_onnx(tiny_model, tmp_path / "onnx")
    return tmp_path / "onnx"


@pytest.mark.heavy  # above 2 s in a full run: too near the 3 s limit
def test_onnx_denoiser_matches_eager_for_batch_1_and_3(exported, tiny_model):
    manifest = read_manifest(exported)
    assert set(manifest["sha256"]) == {DENOISER_FILE, HINT_FILE} and manifest["dtype"] == "float32"
    onnx, eager = make_denoiser(tiny_model, "onnx", engine_dir=exported), make_denoiser(tiny_model, "eager")
    generator = torch.Generator().manual_seed(3)
    for batch, timestep in ((1, 999), (3, 421)):
        features = torch.randn(batch, *tiny_model.feature_spec.shape, generator=generator)
        hint = tiny_model.controlnet.embed(features).detach()
        sample = torch.randn(batch, *tiny_model.latent_shape, generator=generator)
        context = tiny_model.context.expand(batch, -1, -1)
        want, got = eager(sample, timestep, hint, context), onnx(sample, timestep, hint, context)
        assert got.shape == want.shape
        assert float((got - want).abs().max() / want.abs().max()) <= 1e-4


@pytest.mark.heavy
def test_the_dynamo_exporter_gives_the_same_denoiser(tmp_path, tiny_model):
    """torch.onnx's successor exporter (opset 18), with the same dynamic batch and the same numbers."""
    manifest = export_onnx(tiny_model, tmp_path / "dynamo", exporter="dynamo")
    assert manifest["exporter"] == "dynamo" and manifest["opset"] == 18
    onnx, eager = make_denoiser(tiny_model, "onnx", engine_dir=tmp_path / "dynamo"), make_denoiser(tiny_model, "eager")
    generator = torch.Generator().manual_seed(5)
    for batch in (1, 3):
        hint = tiny_model.controlnet.embed(torch.randn(batch, *tiny_model.feature_spec.shape, generator=generator))
        sample = torch.randn(batch, *tiny_model.latent_shape, generator=generator)
        context = tiny_model.context.expand(batch, -1, -1)
        want, got = eager(sample, 250, hint.detach(), context), onnx(sample, 250, hint.detach(), context)
        assert float((got - want).abs().max() / want.abs().max()) <= 1e-4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"exporter": "jit"}, "exporter must be one of torchscript, dynamo"),
        ({"exporter": "dynamo", "opset": 17}, r"opset must be an integer in \[18,"),
    ],
)
def test_bad_exporter_options_are_named(tmp_path, tiny_model, kwargs, message):
    with pytest.raises(FeatInvError, match=message):
        export_onnx(tiny_model, tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_onnx_hint_encoder_matches_eager(exported, tiny_model):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(exported / HINT_FILE), providers=["CPUExecutionProvider"])
    features = torch.randn(2, *tiny_model.feature_spec.shape, generator=torch.Generator().manual_seed(1))
    (hint,) = session.run(["hint"], {"features": features.numpy()})
    torch.testing.assert_close(
        torch.from_numpy(hint), tiny_model.controlnet.embed(features).detach(), rtol=1e-4, atol=1e-5
    )


def test_whole_reconstruction_through_onnxruntime_equals_eager(exported, tiny_model, tiny_images):
    kwargs = {"steps": 8, "seed": 4, "progress": False}
    eager = Reconstructor(tiny_model).reconstruct(tiny_images, **kwargs)
    onnx = Reconstructor(tiny_model, backend="onnx", engine_dir=exported).reconstruct(tiny_images, **kwargs)
    assert float((onnx.images - eager.images).abs().max()) <= 1e-3
    assert float((onnx.samples - eager.samples).abs().max()) <= 1e-3


@pytest.mark.heavy  # above 2 s in a full run: too near the 3 s limit
def test_export_is_reused_for_the_same_weights_and_redone_for_others(tmp_path, tiny_model, monkeypatch):
    from featinv.engine import onnx as onnx_backend

    monkeypatch.setenv("FEATINV_CACHE", str(tmp_path))
    first = onnx_backend.ensure_export(tiny_model)
    stamp = (first / DENOISER_FILE).stat().st_mtime_ns
    assert onnx_backend.ensure_export(tiny_model) == first and (first / DENOISER_FILE).stat().st_mtime_ns == stamp
    with torch.no_grad():
        tiny_model.controlnet.hint_encoder.conv_out.weight.add_(0.01)
    assert onnx_backend.ensure_export(tiny_model) != first


def test_export_cli_writes_a_checked_onnx_pair(capsys, model_dir, tmp_path):  # noqa: F811
    code, out, _ = run_cli(capsys, "export", "--model", model_dir, "--format", "onnx", "--out", tmp_path / "e")
    assert code == 0 and "checked" in out and "opset 17, torchscript exporter" in out
    assert json.loads((tmp_path / "e" / "manifest.json").read_text())["inputs"][DENOISER_FILE] == [
        "sample",
        "timestep",
        "context",
        "hint",
    ]


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_missing_tensorrt_is_one_line_and_exit_2(capsys, model_dir, tmp_path):  # noqa: F811
    code, _, err = run_cli(capsys, "export", "--model", model_dir, "--format", "tensorrt", "--out", tmp_path / "t")
    assert_one_line_error(code, err, "pip install tensorrt")
    assert not (tmp_path / "t").exists()
    image = tmp_path / "in.png"
    from featinv.images import save_image

    save_image(torch.rand(3, 32, 32), image)
    code, _, err = run_cli(
        capsys, "reconstruct", "--model", model_dir, "--images", image, "--backend", "tensorrt", "--out", tmp_path / "o"
    )
    assert_one_line_error(code, err, "pip install tensorrt")


def _key(**changes) -> EngineKey:
    fields = {
        "onnx_sha256": "ab" * 32,
        "tensorrt_version": "10.9.0",
        "compute_capability": "9.0",
        "precision": "fp16",
        "profiles": ((2, 2, 32),),
    }
    return EngineKey(**{**fields, **changes})


def test_engine_key_changes_with_every_field():
    base = _key().digest()
    others = [
        _key(onnx_sha256="cd" * 32),
        _key(tensorrt_version="10.10.0"),
        _key(compute_capability="8.9"),
        _key(precision="fp32"),
        _key(profiles=((2, 4, 32),)),
    ]
    digests = {k.digest() for k in others}
    assert base == _key().digest() and base not in digests and len(digests) == len(others)
    with pytest.raises(FeatInvError, match="precision must be one of"):
        _key(precision="int8")
    with pytest.raises(FeatInvError, match="min <= opt <= max"):
        _key(profiles=((4, 2, 32),))


def test_engine_cache_reuses_valid_engines_and_rebuilds_bad_ones(tmp_path):
    cache, key = EngineCache(tmp_path), _key()
    builds = []

    def build() -> bytes:
        builds.append(1)
        return b"engine-%d" % len(builds)

    def load(data: bytes) -> bytes:
        if data.startswith(b"broken"):
            raise RuntimeError("cannot deserialize")
        return data

    assert cache.load_or_build(key, build, load) == b"engine-1"
    plan, manifest = cache.paths(key)
    assert json.loads(manifest.read_text())["key"]["compute_capability"] == "9.0"
    assert cache.load_or_build(key, build, load) == b"engine-1" and len(builds) == 1  # reused

    plan.write_bytes(b"engine-X")  # altered on disk: the sha256 in the manifest no longer matches
    assert cache.load_or_build(key, build, load) == b"engine-2"
    cache.store(key, b"broken engine", 0.0)  # valid bytes that TensorRT cannot load (a driver update)
    assert cache.load_or_build(key, build, load) == b"engine-3"
    manifest.unlink()  # an engine without its manifest is never trusted
    assert cache.load_or_build(key, build, load) == b"engine-4"
    assert cache.load_or_build(_key(precision="fp32"), build, load) == b"engine-5"  # another key
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".json", ".plan", ".plan"]  # no temp files


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TENSORRT, reason="TensorRT is not installed")
def test_tensorrt_reconstruction_matches_eager(tmp_path, tiny_model, tiny_images):
    kwargs = {"steps": 8, "seed": 4, "progress": False}
    eager = Reconstructor(tiny_model, device="cuda").reconstruct(tiny_images, **kwargs)
    trt = Reconstructor(tiny_model, device="cuda", backend="tensorrt", engine_dir=tmp_path).reconstruct(
        tiny_images, **kwargs
    )
    assert float((trt.images - eager.images).abs().max()) <= 2e-2


@pytest.mark.slow
def test_minisd_scale_denoiser_exports_and_passes_the_checker(tmp_path):
    from conftest import make_extractor

    from featinv.models import FeatInvModel

    model = FeatInvModel.from_preset("minisd", make_extractor("resnet", "layer3"), store_classifier=False).half()
    manifest = export_onnx(model, tmp_path / "minisd", dtype=torch.float16)  # checker runs inside
    assert manifest["latent_shape"] == [4, 32, 32]


def test_tensorrt_batches_outside_the_engine_profile_are_chunked_or_padded():
    """The engine's profile takes 2..32 denoiser rows; a server sends up to 128 (64 images, guided),
    unguided single images send 1. Rows are independent, so chunks and padding change nothing."""
    from featinv.engine.tensorrt import within_rows

    calls = []

    def run(sample, hint):
        calls.append(len(sample))
        assert 2 <= len(sample) <= 32  # what the engine accepts
        return sample * 2 + hint.sum((1, 2, 3), keepdim=True)

    g = torch.Generator().manual_seed(0)
    for rows, expected_calls in ((1, [2]), (2, [2]), (70, [32, 32, 6]), (65, [32, 32, 2])):
        sample, hint = torch.randn(rows, 3, 4, 4, generator=g), torch.randn(rows, 2, 4, 4, generator=g)
        calls.clear()
        got = within_rows(run, 2, 32, sample, hint)
        assert calls == expected_calls
        torch.testing.assert_close(got, sample * 2 + hint.sum((1, 2, 3), keepdim=True))


def test_tensorrt_refusing_an_input_shape_is_one_named_error():
    """TensorRT's set_input_shape returns False for a shape outside the engine's profile; running on
    with it would fail later without saying which input was wrong."""
    from featinv.engine.tensorrt import TensorRTDenoiser

    class Context:  # accepts every input but the hint
        def set_input_shape(self, name, shape):
            return name != "hint"

        def set_tensor_address(self, name, address):
            pass

    denoiser = object.__new__(TensorRTDenoiser)  # no TensorRT here: the context is all _run touches
    denoiser.context, denoiser.rows = Context(), (2, 32)
    sample, hint, context = torch.zeros(2, 4, 8, 8), torch.zeros(2, 320, 8, 8), torch.zeros(2, 1, 32)
    with pytest.raises(FeatInvError, match=r"hint of shape \(2, 320, 8, 8\).*2 to 32 rows"):
        denoiser._run(sample, 500, hint, context)


def test_the_weights_fingerprint_does_not_depend_on_their_memory_layout(tiny_model):
    """The export cache's key: a model converted to channels-last is the same model (it crashed:
    its (C, K, 1, 1) weights count as contiguous, with a last-dim stride a byte view refuses)."""
    from featinv.engine.export import model_fingerprint

    before = model_fingerprint(tiny_model)
    tiny_model.to(memory_format=torch.channels_last)
    assert model_fingerprint(tiny_model) == before

"""The fast path (featinv.engine.fast): the split UNet forward, the step on static buffers with the
fused guided update and device step index, the CUDA-graph capture and the C++ replay loop."""

from __future__ import annotations

import pytest
import torch

from featinv.engine.fast import FastPath
from featinv.engine.split_unet import check_splittable, unet_decode, unet_encode
from featinv.errors import FeatInvError
from featinv.pipeline import Reconstructor

CUDA = torch.cuda.is_available()


def _inputs(model, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    features = torch.rand(batch, *model.feature_spec.shape, generator=g)
    latents = torch.randn(batch, *model.latent_shape, generator=g)
    return features, latents


def test_split_forward_equals_the_unet_with_controlnet_residuals(tiny_model):
    features, x = _inputs(tiny_model, 3)
    context = tiny_model.context.expand(3, -1, -1)
    hint = tiny_model.controlnet.embed(features)
    t = torch.tensor([999, 500, 3])
    with torch.no_grad():
        want = tiny_model.predict_noise(x, t, context, hint)
        down, mid_residual = tiny_model.controlnet(x, t, context, hint)
        emb, skips, mid = unet_encode(tiny_model.unet, x, t, context)
        got = unet_decode(tiny_model.unet, emb, skips, mid, context, down, mid_residual)
    assert float(want.abs().max()) > 0.01  # the residuals are not zero, so the test can fail
    assert torch.equal(got, want)


def test_split_forward_handles_sizes_the_upsamplers_do_not_divide(tiny_extractor):
    from conftest import make_model

    model = make_model(tiny_extractor, image_size=14)  # 14 is not a multiple of 2**num_upsamplers
    _, x = _inputs(model, 1)
    context = model.context
    hint = model.controlnet.embed(torch.rand(1, *model.feature_spec.shape))
    t = torch.tensor([10])
    with torch.no_grad():
        want = model.predict_noise(x, t, context, hint)
        down, mid_residual = model.controlnet(x, t, context, hint)
        got = unet_decode(model.unet, *unet_encode(model.unet, x, t, context), context, down, mid_residual)
    assert torch.equal(got, want)


def test_unsupported_unets_are_refused_clearly(tiny_model):
    tiny_model.unet.register_to_config(class_embed_type="timestep")
    with pytest.raises(FeatInvError, match="class_embed_type"):
        check_splittable(tiny_model.unet)


@pytest.mark.heavy
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
def test_fast_step_equals_the_eager_loop_on_cpu(sampler, tiny_model):
    """The step the graph captures (split forward, fused update from the device table, step index
    incremented on the device), run eagerly here: it gives the reference's samples."""
    features, latents = _inputs(tiny_model, 2)
    reference = Reconstructor(tiny_model)
    want = reference.reconstruct(features=features, latents=latents, steps=8, sampler=sampler, progress=False)
    path = FastPath(tiny_model, compile_mode=None)
    assert not path.graphs and not path.streams  # CPU: no CUDA graphs or streams
    schedule = tiny_model.noise_schedule.ddim(8) if sampler == "ddim" else tiny_model.noise_schedule.dpmpp_2m(8)
    seen = []
    got = path.sample(features, latents, schedule, 1.75, callback=lambda info: seen.append(info["t"]))
    # float rounding only: the fused update reads fp32 coefficients, the Python loop multiplies by doubles
    assert float((got - want.samples).abs().max()) <= 2e-6 * float(want.samples.abs().max())
    assert seen == list(schedule.timesteps)
    step = path.step_graph(2, schedule, 1.75)
    assert int(step.step) == 8
    again = path.sample(features, latents, schedule, 1.75)  # the buffers are reset between runs
    assert torch.equal(again, got)


@pytest.mark.heavy  # above 2 s in a full run: too near the 3 s limit
def test_the_fast_hint_encoder_equals_the_models(tiny_model):
    """The upsample and first convolution fused at the feature map's resolution (the Triton kernel,
    through the interpreter on the CPU) give the model's hints."""
    features, _ = _inputs(tiny_model, 3)
    path = FastPath(tiny_model, compile_mode=None)
    h, w = tiny_model.feature_spec.shape[1:]
    assert h * w < tiny_model.controlnet.hint_encoder.latent_size[0] * tiny_model.controlnet.hint_encoder.latent_size[1]
    with torch.no_grad():
        want = tiny_model.controlnet.embed(features)
        got = path.embed(features)
    assert float(want.abs().max()) > 1e-3  # the test model's hint encoder is not zero at its output
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_the_step_cache_keeps_the_most_recently_used(tiny_model):
    path = FastPath(tiny_model, compile_mode=None, max_graphs=2)
    schedule = tiny_model.noise_schedule.ddim(4)
    one, two = path.step_graph(1, schedule, 1.75), path.step_graph(2, schedule, 1.75)
    assert path.step_graph(1, schedule, 1.75) is one  # a hit, and now the most recent
    path.step_graph(3, schedule, 1.75)  # evicts batch 2, the least recently used
    assert path.step_graph(1, schedule, 1.75) is one
    assert path.step_graph(2, schedule, 1.75) is not two
    assert len(path._graphs) == 2
    with pytest.raises(FeatInvError, match="max_graphs must be a positive integer"):
        FastPath(tiny_model, compile_mode=None, max_graphs=0)


@pytest.mark.heavy
def test_the_null_hint_is_computed_once_and_equals_the_batched_one(tiny_model):
    features, _ = _inputs(tiny_model, 3)
    path = FastPath(tiny_model, compile_mode=None)
    pair = path.hint_pair(features)
    with torch.no_grad():
        want = tiny_model.controlnet.embed(torch.cat([torch.zeros_like(features), features]))
    assert path.null_hint() is path.null_hint()
    assert float((pair - want).abs().max()) <= 1e-6


def test_fast_path_refuses_what_it_does_not_run(tiny_model):
    features, latents = _inputs(tiny_model, 1)
    path = FastPath(tiny_model, compile_mode=None)
    with pytest.raises(FeatInvError, match="scale > 1"):
        path.sample(features, latents, tiny_model.noise_schedule.ddim(4), 1.0)
    with pytest.raises(FeatInvError, match="eta = 0"):
        path.sample(features, latents, tiny_model.noise_schedule.ddim(4, 0.5), 1.75)
    with pytest.raises(FeatInvError, match="compile_mode"):
        FastPath(tiny_model, compile_mode="turbo")


@pytest.mark.skipif(CUDA, reason="checks the error without a GPU")
def test_the_fast_backend_without_a_gpu_is_one_clear_error(tiny_model):
    with pytest.raises(FeatInvError, match="needs a CUDA GPU"):
        Reconstructor(tiny_model, backend="fast")


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
@pytest.mark.parametrize("streams", [True, False])
def test_captured_graph_equals_eager_on_the_gpu(sampler, streams, tiny_model):
    features, latents = _inputs(tiny_model, 3)
    want = Reconstructor(tiny_model, device="cuda").reconstruct(
        features=features, latents=latents, steps=10, sampler=sampler, progress=False
    )
    path = FastPath(tiny_model.cuda(), compile_mode=None, streams=streams)
    assert path.graphs and path.streams == streams
    schedule = tiny_model.noise_schedule.ddim(10) if sampler == "ddim" else tiny_model.noise_schedule.dpmpp_2m(10)
    got = path.sample(features.cuda(), latents.cuda(), schedule, 1.75)
    assert path.step_graph(3, schedule, 1.75).graph is not None
    diff, scale = float((got.cpu() - want.samples).abs().max()), float(want.samples.abs().max())
    assert diff <= 1e-4 * max(1.0, scale), (diff, scale)


def test_cudnn_benchmark_is_on_inside_and_restored_after():
    from featinv.engine.fast import cudnn_benchmark

    saved = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        with pytest.raises(RuntimeError), cudnn_benchmark():
            assert torch.backends.cudnn.benchmark
            raise RuntimeError("a failed capture")
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = saved


@pytest.mark.gpu
def test_capture_leaves_the_cudnn_setting_as_it_was(tiny_model):
    features, latents = _inputs(tiny_model, 1)
    saved = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        path = FastPath(tiny_model.cuda(), compile_mode=None)
        path.sample(features.cuda(), latents.cuda(), tiny_model.noise_schedule.ddim(3), 1.75)
        assert path.step_graph(1, tiny_model.noise_schedule.ddim(3), 1.75).graph is not None
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = saved


@pytest.mark.gpu
def test_cpp_and_python_graph_loops_agree(tiny_model, monkeypatch):
    from featinv.engine import graph_loop

    features, latents = _inputs(tiny_model, 2)
    path = FastPath(tiny_model.cuda(), compile_mode=None)
    schedule = tiny_model.noise_schedule.ddim(12)
    results = {}
    for impl in ("python", "cpp"):
        monkeypatch.setenv("FEATINV_IMPL", impl)
        results[impl] = path.sample(features.cuda(), latents.cuda(), schedule, 1.75)
    assert graph_loop.native_graph_loop("cpp") is not None
    assert torch.equal(results["cpp"], results["python"])


@pytest.mark.skipif(CUDA, reason="checks the no-GPU answers")
def test_the_graph_loop_switch_without_a_gpu(monkeypatch):
    from featinv.engine import graph_loop

    for name, value in (("_module", None), ("_failure", None), ("_warned", False)):
        monkeypatch.setattr(graph_loop, name, value)
    assert graph_loop.native_graph_loop("python") is None
    with pytest.raises(FeatInvError, match=r"FEATINV_IMPL=cpp but the C\+\+ graph loop is unavailable: no CUDA GPU"):
        graph_loop.native_graph_loop("cpp")
    with pytest.warns(RuntimeWarning, match="replaying from Python"):
        assert graph_loop.native_graph_loop("auto") is None
    assert graph_loop.native_graph_loop("auto") is None  # warned once


def test_fast_options_are_checked_before_anything_is_built(tiny_model):
    with pytest.raises(FeatInvError, match="fast_options apply to backend 'fast' only, got backend 'eager'"):
        Reconstructor(tiny_model, fast_options={"twin_encoder": True})
    with pytest.raises(FeatInvError, match=r"unknown option\(s\) twin; FastPath takes .*twin_encoder"):
        Reconstructor(tiny_model, backend="fast", fast_options={"twin": True})


@pytest.mark.gpu
@pytest.mark.parametrize("fast_options", [None, {"twin_encoder": True}])
def test_reconstructor_fast_backend_in_fp16(tiny_model, fast_options):
    features, latents = _inputs(tiny_model, 4)
    kwargs = {"features": features, "latents": latents, "steps": 10, "progress": False, "batch_size": 4}
    want = Reconstructor(tiny_model, device="cuda").reconstruct(**kwargs)
    fast = Reconstructor(tiny_model, device="cuda", dtype=torch.float16, backend="fast", fast_options=fast_options)
    assert (fast.fast.encode_both is not None) == bool(fast_options)
    got = fast.reconstruct(**kwargs)
    diff, scale = float((got.samples - want.samples).abs().max()), float(want.samples.abs().max())
    assert diff <= 2e-2 * max(1.0, scale), (diff, scale)  # fp16 against fp32


@pytest.mark.skipif(CUDA, reason="checks the error without a GPU")
@pytest.mark.parametrize("command", ["reconstruct", "serve"])
def test_cli_fast_backend_without_a_gpu_is_one_line_and_exit_2(command, capsys, tiny_model, tmp_path):
    from featinv.cli import main

    tiny_model.save_pretrained(tmp_path / "model")
    args = ["--model", str(tmp_path / "model"), "--backend", "fast", "--device", "cpu"]
    if command == "reconstruct":
        pytest.importorskip("PIL")
        from featinv.images import save_image

        save_image(torch.rand(3, 32, 32), tmp_path / "a.png")
        args += ["--images", str(tmp_path / "a.png"), "--out", str(tmp_path / "out")]
    else:
        pytest.importorskip("fastapi")
    assert main([command, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA GPU" in err[0], err
    args[args.index("fast")] = "eager"
    assert main([command, *args, "--twin-encoder"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["featinv: error: --twin-encoder needs --backend fast, got --backend eager"], err

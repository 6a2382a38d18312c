"""Consistency distillation (featinv.training.distill) and the few-step lcm sampler: the loss falls,
resumes are exact, sampling is seeded and batch-independent, and a model that is not distilled is
refused clearly."""

import pytest
import torch
from conftest import make_model
from test_cli import run_cli

from featinv.errors import FeatInvError
from featinv.models import FeatInvModel
from featinv.pipeline import Reconstructor
from featinv.sampling import NoiseSchedule
from featinv.training.distill import ConsistencyLoss, DistillConfig, distill_consistency
from featinv.training.loop import TrainConfig
from featinv.training.train import OnlineFeatures, ShapesStream


def _setup(seed: int = 0):
    model = make_model(seed=seed)
    stream = ShapesStream(pool_size=32, seed=3, device=torch.device("cpu"), size=16)
    return model, OnlineFeatures(model.classifier), stream


def test_lcm_timesteps_are_diffusers_lcm_schedulers():
    from diffusers import LCMScheduler

    for steps in (1, 2, 4, 8):
        scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        scheduler.set_timesteps(steps)
        assert list(NoiseSchedule().lcm(steps).timesteps) == scheduler.timesteps.tolist()
    with pytest.raises(FeatInvError, match=r"steps must be an integer in \[1, 50\] for the lcm sampler, got 51"):
        NoiseSchedule().lcm(51)


@pytest.mark.parametrize("target", ["consistency", "endpoint"])
def test_the_distillation_loss_falls_and_resumes_exactly(tmp_path, target):
    distill = DistillConfig(target=target, teacher_steps=3)
    model, features, stream = _setup()
    teacher = __import__("copy").deepcopy(model.controlnet)
    probe = ConsistencyLoss(model, teacher, features, stream, 8, distill)
    with torch.no_grad():
        before = sum(float(probe(model.controlnet, key)) for key in range(1000, 1004))
    config = TrainConfig(steps=30, lr=2e-3, batch_size=8, checkpoint_every=0, log_every=10, warmup_fraction=0.0)
    distill_consistency(model, features, stream, config, distill, seed=1)
    with torch.no_grad():
        after = sum(float(probe(model.controlnet, key)) for key in range(1000, 1004))
    assert after < 0.85 * before, (before, after)
    assert model.distillation == {"method": "consistency", "guidance_scale": 1.75, "skip": 20}

    def run(steps: int, resume: bool) -> dict[str, torch.Tensor]:
        model, features, stream = _setup()
        config = TrainConfig(steps=steps, lr=2e-3, batch_size=4, checkpoint_every=2, warmup_fraction=0.0)
        checkpoints = {"checkpoint_dir": tmp_path / "ckpt", "resume": resume}
        distill_consistency(model, features, stream, config, distill, seed=1, **checkpoints)
        return model.controlnet.state_dict()

    straight = run(4, False)
    __import__("shutil").rmtree(tmp_path / "ckpt")
    run(2, False)
    resumed = run(4, True)
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name


def _distilled(tmp_path):
    model = make_model()
    model.distillation = DistillConfig().to_dict()
    model.save_pretrained(tmp_path / "distilled")
    return FeatInvModel.from_pretrained(tmp_path / "distilled")


def test_few_step_sampling_is_seeded_and_batch_independent(tmp_path):
    model = _distilled(tmp_path)
    assert model.distillation["method"] == "consistency"
    reconstructor = Reconstructor(model)
    features = torch.randn(3, *model.feature_spec.shape, generator=torch.Generator().manual_seed(0))
    for steps in (1, 2, 4):
        whole = reconstructor.reconstruct(features=features, steps=steps, seed=4, progress=False).images
        again = reconstructor.reconstruct(features=features, steps=steps, seed=4, progress=False).images
        ones = reconstructor.reconstruct(features=features, steps=steps, seed=4, batch_size=1, progress=False).images
        assert torch.equal(whole, again)
        torch.testing.assert_close(whole, ones, rtol=0, atol=1e-5)  # CPU GEMM rounding differs with the batch
    other = reconstructor.reconstruct(features=features, steps=4, seed=5, progress=False).images
    assert not torch.equal(other, whole)


def test_a_model_that_is_not_distilled_is_refused_clearly(capsys, tmp_path):
    from safetensors.torch import save_file

    model = make_model()
    features = torch.zeros(1, *model.feature_spec.shape)
    with pytest.raises(FeatInvError, match="the lcm sampler needs a consistency-distilled model"):
        Reconstructor(model).reconstruct(features=features, sampler="lcm", steps=4, progress=False)
    distilled = _distilled(tmp_path)
    with pytest.raises(FeatInvError, match="is consistency-distilled: sample it with the lcm sampler, not 'ddim'"):
        Reconstructor(distilled).reconstruct(features=features, sampler="ddim", steps=4, progress=False)
    with pytest.raises(FeatInvError, match="guidance 1.75 folded in: guidance_scale must be <= 1, got 2"):
        Reconstructor(distilled).reconstruct(features=features, guidance_scale=2, progress=False)
    model.save_pretrained(tmp_path / "plain")
    save_file({"features": features}, str(tmp_path / "f.safetensors"))
    common = ["reconstruct", "--features", tmp_path / "f.safetensors", "--out", tmp_path / "out"]
    for folder, extra, message in (
        ("plain", ["--sampler", "lcm"], "the lcm sampler needs a consistency-distilled model"),
        ("distilled", ["--steps", "51"], "steps must be an integer in [1, 50] for the lcm sampler, got 51"),
    ):
        code, out, err = run_cli(capsys, *common, "--model", tmp_path / folder, *extra)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out").exists()
    code, out, err = run_cli(capsys, "serve", "--model", tmp_path / "plain", "--realtime", "--port", "1")
    assert code == 2 and "--realtime needs a consistency-distilled model" in err


def test_the_shipped_realtime_model_in_demo_reconstruct_and_the_server(capsys, tmp_path):
    from featinv.paths import PRETRAINED, REALTIME_DIR
    from featinv.serving import RealtimeReconstructor

    folder = PRETRAINED / REALTIME_DIR
    model = FeatInvModel.from_pretrained(folder)
    assert model.distillation is not None and model.base is not None  # on the shared base, not a copy
    assert not (folder / "unet").exists()
    code, out, err = run_cli(capsys, "demo", "--n", 4, "--realtime", "--realtime-steps", 2, "--out", tmp_path / "d")
    assert code == 0, err
    assert "real-time (2 lcm steps)" in out and "seconds per image" in out and "real-time - spatial" in out
    metrics = __import__("json").loads((tmp_path / "d" / "metrics.json").read_text())
    assert metrics["realtime_steps"] == 2 and set(metrics["seconds_per_image"]) == {"spatial", "pooled", "realtime"}
    server = RealtimeReconstructor(folder, device="cpu", warmup=False)
    try:
        assert (server.steps, server.sampler, server.guidance_scale) == (4, "lcm", 1.0)
        assert server.describe_sampling() == "real-time mode: 4 lcm steps of a consistency-distilled model"
        images = server.submit(features=torch.zeros(2, *model.feature_spec.shape), seed=3).result()
        assert images.shape == (2, 3, 32, 32)
    finally:
        server.close()

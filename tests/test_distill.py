"""Distillation (featinv.training.distill: consistency and guidance targets) and the few-step
samplers: the loss falls, resumes are exact, sampling is seeded and batch-independent, featinv.json
records the method, and a model that is not distilled is refused clearly."""

import pytest
import torch
from conftest import make_model
from helpers import run_cli

from featinv.data.streams import ShapesStream
from featinv.errors import FeatInvError
from featinv.models import FeatInvModel
from featinv.pipeline import Reconstructor
from featinv.sampling import NoiseSchedule
from featinv.training.distill import DistillationLoss, DistillConfig, distill
from featinv.training.feature_cache import OnlineFeatures
from featinv.training.loop import TrainConfig


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


@pytest.mark.heavy
@pytest.mark.parametrize("target", ["consistency", "endpoint", "guidance", "trajectory"])
def test_the_distillation_loss_falls_and_resumes_exactly(tmp_path, target):
    distillation = DistillConfig(target=target, teacher_steps=3, student_steps=2)
    model, features, stream = _setup()
    teacher = __import__("copy").deepcopy(model.controlnet)
    probe = DistillationLoss(model, teacher, features, stream, 8, distillation)
    with torch.no_grad():
        before = sum(float(probe(model.controlnet, key)) for key in range(1000, 1004))
    config = TrainConfig(steps=30, lr=2e-3, batch_size=8, checkpoint_every=0, log_every=10, warmup_fraction=0.0)
    distill(model, features, stream, config, distillation, seed=1)
    with torch.no_grad():
        after = sum(float(probe(model.controlnet, key)) for key in range(1000, 1004))
    assert after < 0.85 * before, (before, after)
    expected = {"method": "consistency", "guidance_scale": 1.75, "skip": 20}
    if target in ("guidance", "trajectory"):
        expected = {"method": "guidance", "guidance_scale": 1.75}
    assert model.distillation == expected

    def run(steps: int, resume: bool) -> dict[str, torch.Tensor]:
        model, features, stream = _setup()
        config = TrainConfig(steps=steps, lr=2e-3, batch_size=4, checkpoint_every=2, warmup_fraction=0.0)
        checkpoints = {"checkpoint_dir": tmp_path / "ckpt", "resume": resume}
        distill(model, features, stream, config, distillation, seed=1, **checkpoints)
        return model.controlnet.state_dict()

    straight = run(4, False)
    __import__("shutil").rmtree(tmp_path / "ckpt")
    run(2, False)
    resumed = run(4, True)
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name


def _distilled(tmp_path, target: str = "endpoint"):
    model = make_model()
    model.distillation = DistillConfig(target=target).to_dict()
    model.save_pretrained(tmp_path / target)
    return FeatInvModel.from_pretrained(tmp_path / target)


@pytest.mark.parametrize(("target", "sampler"), [("endpoint", "lcm"), ("guidance", "dpmpp")])
def test_few_step_sampling_is_seeded_and_batch_independent(tmp_path, target, sampler):
    model = _distilled(tmp_path, target)
    assert model.few_step_sampler == sampler
    reconstructor = Reconstructor(model)
    assert reconstructor.sampling_defaults(None, None, None) == (4, 1.0, sampler)
    features = torch.randn(3, *model.feature_spec.shape, generator=torch.Generator().manual_seed(0))
    for steps in (1, 2, 4):
        whole = reconstructor.reconstruct(features=features, steps=steps, seed=4, progress=False).images
        again = reconstructor.reconstruct(features=features, steps=steps, seed=4, progress=False).images
        ones = reconstructor.reconstruct(features=features, steps=steps, seed=4, batch_size=1, progress=False).images
        assert torch.equal(whole, again)
        torch.testing.assert_close(whole, ones, rtol=0, atol=1e-5)  # CPU GEMM rounding differs with the batch
    other = reconstructor.reconstruct(features=features, steps=4, seed=5, progress=False).images
    assert not torch.equal(other, whole)


@pytest.mark.heavy  # above 2 s in a full run: too near the 3 s limit
def test_a_model_that_is_not_distilled_is_refused_clearly(capsys, tmp_path):
    from safetensors.torch import save_file

    model = make_model()
    features = torch.zeros(1, *model.feature_spec.shape)
    with pytest.raises(FeatInvError, match="the lcm sampler needs a consistency-distilled model"):
        Reconstructor(model).reconstruct(features=features, sampler="lcm", steps=4, progress=False)
    distilled, guided = _distilled(tmp_path), _distilled(tmp_path, "guidance")
    with pytest.raises(FeatInvError, match="is consistency-distilled: sample it with the lcm sampler, not 'ddim'"):
        Reconstructor(distilled).reconstruct(features=features, sampler="ddim", steps=4, progress=False)
    with pytest.raises(FeatInvError, match="the lcm sampler needs a consistency-distilled model"):
        Reconstructor(guided).reconstruct(features=features, sampler="lcm", steps=4, progress=False)
    for folded in (distilled, guided):
        with pytest.raises(FeatInvError, match="guidance 1.75 folded in: guidance_scale must be <= 1, got 2"):
            Reconstructor(folded).reconstruct(features=features, guidance_scale=2, progress=False)
    model.save_pretrained(tmp_path / "plain")
    save_file({"features": features}, str(tmp_path / "f.safetensors"))
    common = ["reconstruct", "--features", tmp_path / "f.safetensors", "--out", tmp_path / "out"]
    for folder, extra, message in (
        ("plain", ["--sampler", "lcm"], "the lcm sampler needs a consistency-distilled model"),
        ("endpoint", ["--steps", "51"], "steps must be an integer in [1, 50] for the lcm sampler, got 51"),
        ("guidance", ["--guidance", "3"], "folded in: guidance_scale must be <= 1, got 3.0"),
    ):
        code, out, err = run_cli(capsys, *common, "--model", tmp_path / folder, *extra)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out").exists()
    code, out, err = run_cli(capsys, "serve", "--model", tmp_path / "plain", "--realtime", "--port", "1")
    assert code == 2 and "--realtime needs a distilled model" in err


def test_featinv_json_records_the_distillation_and_rejects_a_malformed_one(tmp_path):
    import json

    model = _distilled(tmp_path, "guidance")
    assert model.distillation == {"method": "guidance", "guidance_scale": 1.75}
    path = tmp_path / "guidance" / "featinv.json"
    config = json.loads(path.read_text())
    for bad in ({"method": "guidance", "guidance_scale": 1.75, "skip": 20}, {"method": "lcm", "guidance_scale": 2}):
        path.write_text(json.dumps({**config, "distillation": bad}))
        with pytest.raises(FeatInvError, match="distillation must be null, "):
            FeatInvModel.from_pretrained(tmp_path / "guidance")


@pytest.mark.heavy  # above 2 s in a full run: too near the 3 s limit
def test_the_shipped_realtime_model_in_demo_reconstruct_and_the_server(capsys, tmp_path):
    from featinv.paths import PRETRAINED, REALTIME_DIR
    from featinv.serving import ReconstructionServer

    folder = PRETRAINED / REALTIME_DIR
    model = FeatInvModel.from_pretrained(folder)
    assert model.distillation is not None and model.base is not None  # on the shared base, not a copy
    assert not (folder / "unet").exists()
    code, out, err = run_cli(capsys, "demo", "--n", 4, "--realtime", "--realtime-steps", 2, "--out", tmp_path / "d")
    assert code == 0, err
    assert "real-time (2 dpmpp steps)" in out and "seconds per image" in out and "real-time - spatial" in out
    metrics = __import__("json").loads((tmp_path / "d" / "metrics.json").read_text())
    assert metrics["realtime_steps"] == 2 and set(metrics["seconds_per_image"]) == {"spatial", "pooled", "realtime"}
    server = ReconstructionServer(folder, device="cpu", warmup=False)
    try:
        assert (server.steps, server.sampler, server.guidance_scale) == (4, "dpmpp", 1.0)
        assert server.describe_sampling() == "real-time mode: 4 dpmpp steps of a guidance-distilled model"
        images = server.submit(features=torch.zeros(2, *model.feature_spec.shape), seed=3).result()
        assert images.shape == (2, 3, 32, 32)
    finally:
        server.close()


@pytest.mark.heavy  # above 2 s in a full run: too near the 3 s limit
def test_a_second_stage_starts_from_a_distilled_student(capsys, tmp_path):
    teacher = make_model()
    teacher.save_pretrained(tmp_path / "teacher")
    stage1 = make_model()  # a first stage: the teacher's ControlNet, moved
    with torch.no_grad():
        for value in stage1.controlnet.parameters():
            value.add_(0.1 * torch.randn(value.shape, generator=torch.Generator().manual_seed(value.numel())))
    stage1.distillation = DistillConfig(target="guidance").to_dict()
    stage1.save_pretrained(tmp_path / "guidance")
    common = ["train", "--model", tmp_path / "teacher", "--pool", 16, "--batch-size", 2, "--steps", 1]
    second = [*common, "--distill", "--distill-target", "trajectory", "--teacher-steps", 2, "--checkpoint-every", 0]
    student = ["--student", tmp_path / "guidance", "--consistency-weight", 0.1]  # with the features' term
    code, out, err = run_cli(capsys, *second, *student, "--out", tmp_path / "rt")
    assert code == 0, err
    distilled = FeatInvModel.from_pretrained(tmp_path / "rt" / "model")
    assert distilled.distillation == {"method": "guidance", "guidance_scale": 1.75}

    def farthest(other: FeatInvModel) -> float:
        pairs = zip(distilled.controlnet.parameters(), other.controlnet.parameters(), strict=True)
        return max(float((a.detach() - b.detach()).abs().max()) for a, b in pairs)

    assert farthest(stage1) < 0.01 < 0.1 < farthest(teacher)  # one step from the student, not the teacher
    for extra, message in (
        (["--student", tmp_path / "teacher"], "the student to start from is not distilled"),
        (["--student", tmp_path / "nowhere"], "--student folder not found"),
    ):
        code, out, err = run_cli(capsys, *second, *extra, "--out", tmp_path / "bad")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    code, out, err = run_cli(capsys, *common, "--student", tmp_path / "guidance", "--out", tmp_path / "bad")
    assert code == 2 and "--student applies only with --distill" in err
    code, out, err = run_cli(capsys, *common, "--distill", "--consistency-weight", 0.1, "--out", tmp_path / "bad")
    assert code == 2 and "--consistency-weight goes with --distill only with --distill-target trajectory" in err
    assert not (tmp_path / "bad").exists()

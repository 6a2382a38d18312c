"""The training loop: loss goes down, checkpoints survive crashes, resume is exact, features cached
or online are the same, and the data sources (shapes pool, image folder) are deterministic."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from conftest import make_model

from featinv.data.streams import ShapesStream
from featinv.errors import FeatInvError
from featinv.training import checkpoint as ckpt
from featinv.training.feature_cache import OnlineFeatures, build_cache, load_cache
from featinv.training.loop import TrainConfig
from featinv.training.train import train_base, train_controlnet


def _stream(pool: int = 48) -> ShapesStream:
    return ShapesStream(pool_size=pool, seed=3, device=torch.device("cpu"), size=16)


@pytest.mark.heavy
def test_a_few_training_steps_lower_the_loss(tiny_extractor):
    model = make_model(tiny_extractor)
    stream = _stream(64)
    base = train_base(model, stream, TrainConfig(steps=40, lr=3e-3, batch_size=16, log_every=1), seed=0)
    assert sum(base.losses[-5:]) < sum(base.losses[:5]) and base.finished
    control = train_controlnet(
        model, OnlineFeatures(tiny_extractor), stream, TrainConfig(steps=30, lr=1e-3, batch_size=8, log_every=1)
    )
    assert sum(control.losses[-5:]) < sum(control.losses[:5])


class _Crash(Exception):
    pass


class _CrashingStream(ShapesStream):
    """A stream whose batch ``crash_at`` raises, as a killed process would stop there."""

    crash_at = -1

    def draw(self, key, batch_size, flip=True):
        if key == self.crash_at:
            raise _Crash(f"crash at batch {key}")
        return super().draw(key, batch_size, flip)


def _train_controlnet(extractor, stream, out, resume=False):
    """Fresh model, same seed: what a restarted process would build before resuming."""
    model = make_model(extractor)
    config = TrainConfig(steps=7, lr=1e-3, batch_size=4, grad_accum=2, ema_decay=0.9, checkpoint_every=2, log_every=1)
    result = train_controlnet(
        model, OnlineFeatures(extractor), stream, config, seed=5, checkpoint_dir=out, resume=resume
    )
    return model, result


@pytest.mark.heavy  # above 2 s in a full run: too near the 3 s limit
def test_resume_after_an_interruption_gives_the_same_weights(tiny_extractor, tmp_path):
    straight, _ = _train_controlnet(tiny_extractor, _stream(), tmp_path / "straight")

    crashing = _CrashingStream(pool_size=48, seed=3, device=torch.device("cpu"), size=16)
    crashing.crash_at = 2 * 5 + 1  # the second micro-batch of step 5: checkpoints exist for steps 2 and 4
    with pytest.raises(_Crash):
        _train_controlnet(tiny_extractor, crashing, tmp_path / "resumed")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "resumed")] == ["step-0000002", "step-0000004"]
    resumed, result = _train_controlnet(tiny_extractor, _stream(), tmp_path / "resumed", resume=True)

    assert result.finished and result.steps_done == 7
    for (name, a), b in zip(
        straight.controlnet.state_dict().items(), resumed.controlnet.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    untrained = make_model(tiny_extractor).controlnet.state_dict()
    assert not torch.equal(untrained["hint_encoder.conv_out.weight"], straight.controlnet.hint_encoder.conv_out.weight)


def _toy_checkpoint(step: int) -> ckpt.Checkpoint:
    return ckpt.Checkpoint(step, {"model": {"w": torch.full((3,), float(step))}}, {"note": step})


def test_a_crash_mid_checkpoint_leaves_the_last_good_one(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, _toy_checkpoint(2))
    writes = []

    def dying_save_file(tensors, filename, metadata=None):
        writes.append(filename)
        with open(filename, "wb") as handle:  # half a file, then the process "dies"
            handle.write(b"\x00" * 7)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", dying_save_file)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, _toy_checkpoint(4))
    monkeypatch.undo()
    assert writes and [p.name for p in tmp_path.iterdir()] == ["step-0000002"]
    assert ckpt.load_latest_checkpoint(tmp_path).step == 2

    # A checkpoint damaged after it was written (a torn copy, a bad disk) is skipped too.
    ckpt.save_checkpoint(tmp_path, _toy_checkpoint(6))
    (tmp_path / "step-0000006" / "model.safetensors").write_bytes(b"\x01" * 16)
    with pytest.warns(UserWarning, match="damaged checkpoint"):
        latest = ckpt.load_latest_checkpoint(tmp_path)
    assert latest.step == 2 and torch.equal(latest.tensors["model"]["w"], torch.full((3,), 2.0))
    # A partial folder left by a killed writer is never listed as a checkpoint.
    shutil.copytree(tmp_path / "step-0000002", tmp_path / ".step-0000008.abc.partial")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-0000002", "step-0000006"]


def test_checkpoints_keep_only_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, _toy_checkpoint(step), keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-0000003", "step-0000004"]
    assert ckpt.load_checkpoint(tmp_path / "step-0000004").state == {"note": 4}


@pytest.mark.heavy  # above 2 s in a full run: too near the 3 s limit
def test_resume_refuses_a_checkpoint_of_other_settings(tiny_extractor, tmp_path):
    _train_controlnet(tiny_extractor, _stream(), tmp_path)
    model = make_model(tiny_extractor)
    other = TrainConfig(steps=9, lr=2e-3, batch_size=4, grad_accum=2)
    with pytest.raises(FeatInvError, match="cannot resume"):
        train_controlnet(model, OnlineFeatures(tiny_extractor), _stream(), other, checkpoint_dir=tmp_path, resume=True)
    fewer = TrainConfig(steps=5, lr=1e-3, batch_size=4, grad_accum=2)
    with pytest.raises(FeatInvError, match="past --steps 5"):
        train_controlnet(model, OnlineFeatures(tiny_extractor), _stream(), fewer, checkpoint_dir=tmp_path, resume=True)


@pytest.mark.heavy  # above 2 s in a full run: too near the 3 s limit
def test_a_finished_run_extends_with_more_steps(tiny_extractor, tmp_path, capsys):
    """The last step is checkpointed, so a larger --steps continues a finished run from there."""
    finished, _ = _train_controlnet(tiny_extractor, _stream(), tmp_path)
    assert ckpt.list_checkpoints(tmp_path)[-1].name == "step-0000007"
    model = make_model(tiny_extractor)
    longer = TrainConfig(steps=9, lr=1e-3, batch_size=4, grad_accum=2, ema_decay=0.9, log_every=1)
    result = train_controlnet(
        model, OnlineFeatures(tiny_extractor), _stream(), longer, seed=5, checkpoint_dir=tmp_path, resume=True
    )
    assert result.finished and result.steps_done == 9 and len(result.losses) == 9
    assert "extending the run of 7 steps to 9" in capsys.readouterr().out
    weight = "hint_encoder.conv_out.weight"
    assert not torch.equal(model.controlnet.state_dict()[weight], finished.controlnet.state_dict()[weight])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_and_gradient_checkpointing_train(tiny_extractor, precision):
    """bf16 and fp16 autocast (fp16 with a gradient scaler) train on a CPU too; gradient
    checkpointing recomputes activations and gives the weights of a run without it."""
    stream = _stream()
    weights = []
    for checkpointing in (False, True):
        model = make_model(tiny_extractor)
        config = TrainConfig(steps=3, lr=1e-3, batch_size=4, mixed_precision="no")
        train_controlnet(
            model, OnlineFeatures(tiny_extractor), stream, config, seed=2, gradient_checkpointing=checkpointing
        )
        weights.append(model.controlnet.hint_encoder.conv_out.weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-4, atol=1e-6)
    model = make_model(tiny_extractor)
    config = TrainConfig(steps=3, lr=1e-3, batch_size=4, mixed_precision=precision, log_every=1)
    result = train_controlnet(model, OnlineFeatures(tiny_extractor), stream, config, seed=2)
    assert all(math.isfinite(loss) for loss in result.losses)
    drift = (model.controlnet.hint_encoder.conv_out.weight - weights[0]).abs().max()
    assert 0 < float(drift) < 1e-2  # autocast changed the arithmetic, not the training
    with pytest.raises(FeatInvError, match="mixed_precision must be one of"):
        TrainConfig(steps=1, lr=1e-3, batch_size=2, mixed_precision="fp8")


def test_cached_and_online_features_are_equal(tiny_extractor, tmp_path):
    stream = _stream(40)
    path = build_cache(tiny_extractor, stream, tmp_path / "cache.safetensors", batch_size=16, progress=False)
    cached, online = load_cache(path, tiny_extractor, stream), OnlineFeatures(tiny_extractor)
    for key in range(3):
        index, flips = stream.draw(key, 8)
        assert flips.any() and not flips.all()
        images, _ = stream.take(index, flips)
        torch.testing.assert_close(cached(images, index, flips), online(images, index, flips), rtol=1e-5, atol=1e-5)
    with pytest.raises(FeatInvError, match="made for the pool"):
        load_cache(path, tiny_extractor, _stream(41))


def test_training_from_the_cache_matches_online_training(tiny_extractor, tmp_path):
    stream = _stream(40)
    cache = load_cache(
        build_cache(tiny_extractor, stream, tmp_path / "c.safetensors", progress=False), tiny_extractor, stream
    )
    results = []
    for features in (OnlineFeatures(tiny_extractor), cache):
        model = make_model(tiny_extractor)
        train_controlnet(model, features, stream, TrainConfig(steps=3, lr=1e-3, batch_size=4), seed=2)
        results.append(model.controlnet.hint_encoder.conv_out.weight)
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-6)


def test_train_config_rejects_bad_values():
    with pytest.raises(FeatInvError, match=r"grad_accum must be an integer in \[1, 1024\]"):
        TrainConfig(steps=1, lr=1e-3, batch_size=2, grad_accum=0)
    with pytest.raises(FeatInvError, match="ema_decay"):
        TrainConfig(steps=1, lr=1e-3, batch_size=2, ema_decay=1.5)
    config = TrainConfig(steps=100, lr=1.0, batch_size=2, warmup_fraction=0.1)
    rates = [config.learning_rate(s) for s in range(100)]
    assert rates[10] == 1.0 and rates[0] == 0.0 and rates[5] == 0.5 and rates[-1] < 0.01
    assert rates[:11] == sorted(rates[:11]) and rates[10:] == sorted(rates[10:], reverse=True)
    from diffusers.optimization import get_cosine_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    reference = get_cosine_schedule_with_warmup(optimizer, 10, 100)
    expected = []
    for _ in range(100):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    assert rates == pytest.approx(expected, abs=1e-12)

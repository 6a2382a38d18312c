"""Training from the command line: the shapes dataset on disk, the image-folder stream, the feature
cache, and a ControlNet trained on a model folder, interrupted and resumed."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_one_line_error, run_cli

from featinv.data.image_folder import ImageFolderStream
from featinv.data.shapes import CLASSES, shapes_pool
from featinv.images import load_image


def test_data_shapes_writes_imagenet_layout_with_masks(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "data", "shapes", "--out", tmp_path / "d", "--n", 12, "--seed", 4, "--size", 16)
    assert code == 0 and "wrote 12" in out
    pool = shapes_pool(12, 4, 16)
    files = sorted((tmp_path / "d" / "images").rglob("*.png"))
    assert len(files) == 12 and len(list((tmp_path / "d" / "masks").rglob("*.png"))) == 12
    first = next(f for f in files if f.stem == "00000")
    assert first.parent.name == CLASSES[int(pool.labels[0])]
    assert (load_image(first) - pool.images[0]).abs().max() <= 1 / 255

    stream = ImageFolderStream(tmp_path / "d" / "images", 16, seed=2)
    assert len(stream) == 12 and stream.classes == sorted(CLASSES)
    a, labels = stream.batch(3, 5)
    b, _ = stream.batch(3, 5)
    c, _ = stream.batch(4, 5)
    assert a.shape == (5, 3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert labels.tolist() == [stream.classes.index(stream.files[i].parent.name) for i in stream.draw(3, 5)[0]]


def test_data_and_folder_bad_input(capsys, tmp_path):
    code, _, err = run_cli(capsys, "data", "shapes", "--out", tmp_path / "d", "--n", 0)
    assert_one_line_error(code, err, "argument --n: must be an integer in [1, 100_000]")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="ImageNet layout"):
        ImageFolderStream(tmp_path / "empty", 16)


@pytest.mark.heavy  # above 2 s in a full run: too near the 3 s limit
def test_cache_then_train_then_resume_from_the_cli(capsys, tmp_path, model_dir):  # noqa: F811
    cache = tmp_path / "cache.safetensors"
    code, out, _ = run_cli(capsys, "features", "cache", "--model", model_dir, "--pool", 24, "--seed", 2, "--out", cache)
    assert code == 0 and "24 images" in out and cache.is_file()

    common = ["train", "--model", model_dir, "--pool", 24, "--seed", 2, "--batch-size", 4, "--steps", 6]
    common += ["--checkpoint-every", 2, "--features-cache", cache, "--out", tmp_path / "run", "--ema", 0.9]
    code, out, _ = run_cli(capsys, *common, "--time-budget", 0)  # stops after its first step, checkpointed
    assert code == 0 and "stopped at step 1" in out
    code, out, _ = run_cli(capsys, *common, "--resume")
    assert code == 0 and "resuming from" in out and "finished" in out
    rows = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][-1] == 6 and {"loss", "lr", "images_per_s"} <= set(rows[-1])
    assert (tmp_path / "run" / "model" / "featinv.json").is_file() and (tmp_path / "run" / "loss_curve.png").is_file()

    # A model from a checkpoint: the last one's moving average is the run's model; raw weights differ.
    from featinv.models import FeatInvModel

    checkpoints = tmp_path / "run" / "checkpoints"
    restore = ["from-checkpoint", "--model", model_dir, "--checkpoint"]
    code, out, _ = run_cli(capsys, *restore, checkpoints / "step-0000006", "--out", tmp_path / "e6")
    assert code == 0 and "step 6, its moving average" in out
    code, out, _ = run_cli(capsys, *restore, checkpoints / "step-0000004", "--raw", "--out", tmp_path / "r4")
    assert code == 0 and "step 4, its raw weights" in out
    final, e6, r4, start = (
        FeatInvModel.from_pretrained(p).controlnet.state_dict()
        for p in (tmp_path / "run" / "model", tmp_path / "e6", tmp_path / "r4", model_dir)
    )
    assert all(torch.equal(final[k], e6[k]) for k in final)
    assert not all(torch.equal(final[k], r4[k]) for k in final)
    assert not all(torch.equal(start[k], r4[k]) for k in start)
    code, _, err = run_cli(capsys, *restore, checkpoints / "step-0000002", "--out", tmp_path / "z")
    assert_one_line_error(code, err, "--checkpoint folder not found")  # only the newest two are kept
    (checkpoints / "step-0000004" / "ema.safetensors").write_bytes(b"altered")
    code, _, err = run_cli(capsys, *restore, checkpoints / "step-0000004", "--out", tmp_path / "z")
    assert_one_line_error(code, err, "does not match its sha256")
    assert not (tmp_path / "z").exists()

    code, _, err = run_cli(capsys, *common[:-6], "--pool", 25, "--features-cache", cache, "--out", tmp_path / "x")
    assert_one_line_error(code, err, "made for the pool")
    code, _, err = run_cli(capsys, "train", "--preset", "shapes-demo", "--model", model_dir, "--out", tmp_path / "y")
    assert_one_line_error(code, err, "exactly one of --preset")


@pytest.mark.heavy  # above 2 s in a full run: too near the 3 s limit
def test_train_with_the_consistency_loss_from_the_cli(capsys, tmp_path, model_dir):  # noqa: F811
    common = ["train", "--model", model_dir, "--pool", 16, "--batch-size", 4, "--steps", 2, "--checkpoint-every", 0]
    code, out, _ = run_cli(
        capsys, *common, "--consistency-weight", 0.5, "--consistency-max-t", 1000, "--out", tmp_path / "a"
    )
    assert code == 0 and "finished" in out
    rows = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    code, out, _ = run_cli(capsys, *common, "--out", tmp_path / "b")
    plain = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] > plain[0]["loss"]  # same first batch; the consistency term adds to it

    code, _, err = run_cli(capsys, *common, "--consistency-weight", 0, "--out", tmp_path / "c")
    assert_one_line_error(code, err, "--consistency-weight) must be > 0")
    code, out, _ = run_cli(
        capsys, *common[:-2], "--checkpoint-every", 1, "--keep-checkpoints", 0, "--out", tmp_path / "k"
    )
    assert code == 0 and sorted(p.name for p in (tmp_path / "k" / "checkpoints").iterdir()) == [
        "step-0000001",
        "step-0000002",
    ]
    code, _, err = run_cli(capsys, *common, "--keep-checkpoints", -1, "--out", tmp_path / "j")
    assert_one_line_error(code, err, "argument --keep-checkpoints: must be an integer in [0, 10000]")
    code, _, err = run_cli(
        capsys, "train", "--preset", "shapes-demo", "--consistency-weight", 1, "--out", tmp_path / "d"
    )
    assert_one_line_error(code, err, "applies to --model training")


def test_a_model_from_a_checkpoint_of_another_stage_or_shape_is_refused(model_dir):  # noqa: F811
    from featinv.errors import FeatInvError
    from featinv.models import FeatInvModel
    from featinv.training.checkpoint import Checkpoint
    from featinv.training.from_checkpoint import load_checkpoint_into

    model = FeatInvModel.from_pretrained(model_dir)
    weights = model.controlnet.state_dict()
    with pytest.raises(FeatInvError, match="of stage 'distill'"):
        load_checkpoint_into(model, Checkpoint(3, {"model": weights}, {"stage": "distill"}))
    narrower = {k: v[:1] if k.startswith("hint_encoder.conv_in.") else v for k, v in weights.items()}
    with pytest.raises(FeatInvError, match="shaped unlike this model's"):
        load_checkpoint_into(model, Checkpoint(3, {"model": narrower}, {"stage": "controlnet"}))
    assert load_checkpoint_into(model, Checkpoint(3, {"model": weights}, {"stage": "controlnet"})) == "raw"

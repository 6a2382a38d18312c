"""Training from the command line: the shapes dataset on disk, the image-folder stream, the feature
cache, and a ControlNet trained on a model folder, interrupted and resumed."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import assert_one_line_error, model_dir, run_cli  # noqa: F401  (fixture)

from featinv.images import load_image
from featinv.training.image_folder import ImageFolderStream
from featinv.training.shapes import CLASSES, shapes_pool


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
    assert_one_line_error(code, err, "--n >= 1")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="ImageNet layout"):
        ImageFolderStream(tmp_path / "empty", 16)


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

    code, _, err = run_cli(capsys, *common[:-6], "--pool", 25, "--features-cache", cache, "--out", tmp_path / "x")
    assert_one_line_error(code, err, "made for the pool")
    code, _, err = run_cli(capsys, "train", "--preset", "shapes-demo", "--model", model_dir, "--out", tmp_path / "y")
    assert_one_line_error(code, err, "exactly one of --preset")


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
    code, _, err = run_cli(
        capsys, "train", "--preset", "shapes-demo", "--consistency-weight", 1, "--out", tmp_path / "d"
    )
    assert_one_line_error(code, err, "applies to --model training")

"""Transfer of a trained ControlNet to another classifier on the same base (featinv.training.transfer,
``featinv train --transfer-from``): the body is copied, the hint encoder learns the teacher's
embeddings from the new classifier's maps, and the result is an ordinary model folder."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_one_line_error, run_cli

from featinv.data.shapes import generate_shapes
from featinv.models import FeatInvModel
from featinv.paths import BASE_DIR, PRETRAINED, SPATIAL_DIR
from featinv.pipeline import Reconstructor
from featinv.training.transfer import NEW_CLASSIFIER_KEYS

TEACHER = PRETRAINED / SPATIAL_DIR
RESNET = ["--classifier", "resnet18", "--input-size", 32, "--classifier-kwargs"]
RESNET_KWARGS = {"num_classes": 6, "layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "output_stride": 8}
TRAIN = ["--steps", 30, "--batch-size", 8, "--pool", 64, "--lr", 3e-3, "--checkpoint-every", 0]


def _create(capsys, out, *extra):
    args = ["create", "--base", PRETRAINED / BASE_DIR, *RESNET, json.dumps(RESNET_KWARGS), "--hint-channels", 64]
    code, _, err = run_cli(capsys, *args, "--out", out, *extra)
    assert code == 0, err


def _embedding_error(model: FeatInvModel, teacher: FeatInvModel, images: torch.Tensor) -> float:
    with torch.no_grad():
        ours = model.controlnet.embed(model.classifier(images))
        theirs = teacher.controlnet.embed(teacher.classifier(images))
    return float(torch.nn.functional.mse_loss(ours, theirs))


@pytest.mark.heavy  # above 2 s in a full run: too near the 3 s limit
def test_transfer_copies_the_body_and_teaches_the_hint_encoder(capsys, tmp_path):
    _create(capsys, tmp_path / "resnet")
    code, text, err = run_cli(
        capsys, "train", "--model", tmp_path / "resnet", "--transfer-from", TEACHER, *TRAIN, "--out", tmp_path / "run"
    )
    assert code == 0, err
    assert "finished; wrote" in text
    fresh, teacher = FeatInvModel.from_pretrained(tmp_path / "resnet"), FeatInvModel.from_pretrained(TEACHER)
    made = FeatInvModel.from_pretrained(tmp_path / "run" / "model")
    assert made.feature_spec == fresh.feature_spec and made.base_fingerprint == teacher.base_fingerprint
    ours, theirs = made.controlnet.state_dict(), teacher.controlnet.state_dict()
    copied = [k for k in ours if not k.startswith(NEW_CLASSIFIER_KEYS + ("hint_encoder.",))]
    assert copied and all(torch.equal(ours[k], theirs[k]) for k in copied)  # the body, untouched after
    images = generate_shapes(16, seed=7, size=32).images
    before, after = _embedding_error(fresh, teacher, images), _embedding_error(made, teacher, images)
    assert after < 0.8 * before, (before, after)

    # the result reconstructs like any model folder
    result = Reconstructor(made).reconstruct(images[:2], steps=2, seed=0)
    assert result.images.shape == (2, 3, 32, 32) and torch.isfinite(result.images).all()


def test_transfer_refuses_what_it_cannot_start_from(capsys, tmp_path):
    _create(capsys, tmp_path / "resnet")
    run = ["train", "--model", tmp_path / "resnet", *TRAIN]
    code, _, err = run_cli(
        capsys, *run, "--transfer-from", TEACHER, "--consistency-weight", 0.1, "--out", tmp_path / "a"
    )
    assert_one_line_error(code, err, "--consistency-weight does not go with --transfer-from")
    code, _, err = run_cli(capsys, *run, "--transfer-from", tmp_path / "nowhere", "--out", tmp_path / "b")
    assert_one_line_error(code, err, "--transfer-from folder not found")
    code, _, err = run_cli(capsys, *run, "--transfer-from", tmp_path / "resnet", "--out", tmp_path / "c")
    assert_one_line_error(code, err, "inverts the same features: train this model directly")
    other = ["create", "--preset", "micro", *RESNET, json.dumps(RESNET_KWARGS), "--out", tmp_path / "micro"]
    assert run_cli(capsys, *other)[0] == 0
    code, _, err = run_cli(capsys, *run, "--transfer-from", tmp_path / "micro", "--out", tmp_path / "d")
    assert_one_line_error(code, err, "must be made on the same base as this one")
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_transfer_needs_the_same_controlnet_shape(capsys, tmp_path):
    args = ["create", "--base", PRETRAINED / BASE_DIR, *RESNET, json.dumps(RESNET_KWARGS)]
    assert run_cli(capsys, *args, "--hint-channels", 32, "--out", tmp_path / "narrow")[0] == 0
    run = ["train", "--model", tmp_path / "narrow", *TRAIN, "--transfer-from", TEACHER, "--out", tmp_path / "a"]
    code, _, err = run_cli(capsys, *run)
    assert_one_line_error(code, err, "has another ControlNet architecture")

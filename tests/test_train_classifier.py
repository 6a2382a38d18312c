"""featinv train-classifier: a timm classifier of another family (a narrowed ResNet, a small ViT)
trained on shapes by featinv's own command, its accuracy with an interval, and a FeatInv model made
for it with `create` from the weights it wrote."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_one_line_error, run_cli

from featinv.training.classifier import accuracy

RESNET = ["--classifier", "resnet18", "--classifier-kwargs"]
RESNET_KWARGS = {"num_classes": 6, "layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "output_stride": 8}
VIT = ["--classifier", "vit_tiny_patch16_224", "--classifier-kwargs"]
VIT_KWARGS = {"num_classes": 6, "img_size": 32, "patch_size": 4, "embed_dim": 24, "depth": 1, "num_heads": 2}
SMALL = ["--input-size", 32, "--image-size", 16, "--pool", 64, "--batch-size", 8, "--steps", 3]
SMALL += ["--held-out", 40, "--checkpoint-every", 0]


@pytest.mark.parametrize(
    ("family", "kwargs", "shape"),
    [(RESNET, RESNET_KWARGS, (64, 4, 4)), (VIT, VIT_KWARGS, (24, 8, 8))],  # 32 px: stride 8; 4-px patches
)
def test_train_a_classifier_then_create_a_model_for_it(capsys, tmp_path, family, kwargs, shape):
    from featinv.models import FeatInvModel
    from featinv.weights import load_state_dict

    out = tmp_path / "classifier"
    code, text, err = run_cli(capsys, "train-classifier", *family, json.dumps(kwargs), *SMALL, "--out", out)
    assert code == 0, err
    record = json.loads((out / "classifier.json").read_text())
    top1, (low, high) = record["accuracy"]["top1"], record["accuracy"]["ci95"]
    assert record["model_kwargs"] == kwargs and record["steps"] == 3 and record["input_size"] == [3, 32, 32]
    assert record["accuracy"]["images"] == "40 held-out shapes" and 0 <= low <= top1 <= high <= 1
    assert f"{top1:.3f} [{low:.3f}, {high:.3f}]" in text and "featinv create --classifier" in text
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()][-1] == 3

    weights = out / "classifier.safetensors"
    create = ["create", "--preset", "micro", *family, json.dumps(kwargs), "--input-size", 32]
    code, _, err = run_cli(capsys, *create, "--classifier-weights", weights, "--out", tmp_path / "model")
    assert code == 0, err
    model = FeatInvModel.from_pretrained(tmp_path / "model")
    assert model.feature_spec.shape == shape
    trained = load_state_dict(weights)
    for name, value in model.classifier.classifier.state_dict().items():
        assert torch.equal(value, trained[name]), name


def test_bad_classifier_arguments_are_one_line(capsys, tmp_path):
    few = json.dumps({**RESNET_KWARGS, "num_classes": 3})
    code, _, err = run_cli(capsys, "train-classifier", *RESNET, few, *SMALL, "--out", tmp_path / "a")
    assert_one_line_error(code, err, 'resnet18 has 3 outputs and the data 6 classes: add "num_classes": 6')
    code, _, err = run_cli(capsys, "train-classifier", *RESNET, "[1]", *SMALL, "--out", tmp_path / "b")
    assert_one_line_error(code, err, "--classifier-kwargs must be a JSON object, got '[1]'")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_accuracy_counts_the_argmax_and_gives_its_interval():
    class AlwaysTwo(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))

        def logits(self, images: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot(torch.full((len(images),), 2), 6).float()

    labels = torch.tensor([2, 0, 2, 5, 2, 1, 2, 3, 2, 2])
    rate, (low, high) = accuracy(AlwaysTwo(), torch.zeros(10, 3, 8, 8), labels, batch_size=3)
    assert rate == 0.6 and low < 0.6 < high

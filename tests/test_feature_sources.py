"""Feature sources beyond timm: torchvision, Hugging Face transformers (DINOv2 with registers, a CLIP
vision tower, ViT with its classification head) and the user's own module. Each is checked against
the model's own outputs (CLS and register tokens dropped, the patch grid in row-major order) and
taken through create -> train -> reconstruct on the command line. Tiny models, built from config,
offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, run_cli

from featinv.features import FeatureExtractor, FeatureSpec

transformers = pytest.importorskip("transformers")

USER_MODULE = Path(__file__).with_name("user_classifier.py")
TINY_VIT = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}


def dinov2_folder(root: Path) -> Path:
    """A DINOv2 with 4 registers whose image processor crops 32x48 (a 4x6 grid of 8-px patches)."""
    config = transformers.Dinov2WithRegistersConfig(**TINY_VIT, image_size=32, patch_size=8, num_register_tokens=4)
    folder = root / "dinov2"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformers.AutoModel.from_config(config).save_pretrained(folder)
    processor = {"crop_size": {"height": 32, "width": 48}, "do_center_crop": True, "size": {"shortest_edge": 36}}
    processor |= {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


def clip_folder(root: Path) -> Path:
    """A whole CLIP (text and vision towers): the source takes its vision tower."""
    vision = {**TINY_VIT, "image_size": 32, "patch_size": 8}
    text = {**TINY_VIT, "vocab_size": 64, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformers.CLIPModel(config).save_pretrained(root / "clip")
    return root / "clip"


def vit_classifier_folder(root: Path) -> Path:
    config = transformers.ViTConfig(**TINY_VIT, image_size=32, patch_size=8, num_labels=6)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformers.ViTForImageClassification(config).save_pretrained(root / "vit")
    return root / "vit"


def test_dinov2_with_registers_at_a_non_square_input_matches_its_own_hidden_states(tmp_path):
    folder = dinov2_folder(tmp_path)
    extractor = FeatureExtractor(str(folder), 1, source="transformers")
    spec = extractor.spec
    assert spec.input_size == (3, 32, 48) and spec.shape == (16, 4, 6)  # the processor's crop; 4x6 patches
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.25, 0.25, 0.25) and spec.crop_pct == pytest.approx(32 / 36)
    own = transformers.AutoModel.from_pretrained(folder).eval()
    x = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        hidden = own(pixel_values=(x - 0.5) / 0.25, output_hidden_states=True).hidden_states[1]
        features = extractor(x)
    assert hidden.shape == (2, 1 + 4 + 24, 16)  # CLS, 4 registers, 4x6 patches
    expected = hidden[:, 5:].reshape(2, 4, 6, 16).permute(0, 3, 1, 2)
    torch.testing.assert_close(features, expected)

    rebuilt = FeatureExtractor.from_spec(FeatureSpec.from_dict(json.loads(json.dumps(spec.to_dict()))))
    rebuilt.load_classifier_weights(extractor.classifier.state_dict())
    assert rebuilt.spec == spec  # the config travels in the spec: the folder is not read again
    torch.testing.assert_close(rebuilt(x), features)


def test_a_patch_lands_at_its_row_and_column_of_the_map(tmp_path):
    """One bright patch at (row 2, column 5) of a 4x6 grid comes out at [2, 5] of the map, nowhere else."""
    extractor = FeatureExtractor(str(dinov2_folder(tmp_path)), 0, source="transformers")  # 0: the embeddings
    embeddings = extractor.classifier.embeddings
    with torch.no_grad():
        embeddings.position_embeddings.zero_()  # so that the map is the patch projection alone
        embeddings.patch_embeddings.projection.bias.zero_()
    image = torch.full((1, 3, 32, 48), 0.5)  # 0 after normalisation
    image[:, :, 16:24, 40:48] = 1.0
    with torch.no_grad():
        features = extractor(image)[0].abs().sum(0)
    assert features[2, 5] > 0
    assert features.flatten().nonzero().flatten().tolist() == [2 * 6 + 5]


def test_a_clip_vision_tower_and_a_torchvision_resnet_at_layer3(tmp_path):
    clip = FeatureExtractor(str(clip_folder(tmp_path)), "last", source="transformers")
    assert type(clip.classifier).__name__ == "CLIPVisionModel" and clip.spec.shape == (16, 4, 4)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        hidden = clip.classifier(pixel_values=clip.preprocess(x)).last_hidden_state
        torch.testing.assert_close(clip(x), hidden[:, 1:].reshape(1, 4, 4, 16).permute(0, 3, 1, 2))

    resnet = FeatureExtractor("resnet18", "layer3", source="torchvision", model_kwargs={"num_classes": 6})
    assert resnet.spec.input_size == (3, 224, 224) and resnet.spec.crop_pct == 224 / 256  # its weights' transforms
    net = resnet.classifier
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        normalized = resnet.normalize(x)
        own = net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(normalized)))))))
        torch.testing.assert_close(resnet._features(normalized), own)
    assert resnet.spec.describe() == "torchvision resnet18 layer 'layer3' (256x14x14, spatial)"
    assert resnet.linear_head() is net.fc


def test_a_vit_classifier_and_a_user_module_match_their_own_outputs(tmp_path):
    vit = FeatureExtractor(str(vit_classifier_folder(tmp_path)), source="transformers")
    assert type(vit.classifier).__name__ == "ViTForImageClassification" and vit.spec.shape == (16, 4, 4)
    assert vit.linear_head() is vit.classifier.classifier  # class steering reads this head
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        normalized = vit.preprocess(x)
        hidden = vit.classifier.vit(pixel_values=normalized).last_hidden_state  # CLS + 16 patches
        torch.testing.assert_close(vit(x), hidden[:, 1:].reshape(2, 4, 4, 16).permute(0, 3, 1, 2))
        torch.testing.assert_close(vit.logits(x), vit.classifier(pixel_values=normalized).logits)

    module = FeatureExtractor(f"{USER_MODULE}:tiny_convnet", "features.2", source="module", input_size=(3, 32, 32))
    with torch.no_grad():
        own = module.classifier.features[:3](module.normalize(x))
        torch.testing.assert_close(module(x), own)
    assert module.spec.model == f"{USER_MODULE.resolve()}:tiny_convnet"  # absolute: read from anywhere later


def test_default_layers_are_the_last_spatial_ones():
    resnet = FeatureExtractor("resnet18", source="torchvision", input_size=(3, 64, 64))
    assert resnet.spec.layer == "layer4" and resnet.spec.shape == (512, 2, 2)  # not avgpool's 1x1
    module = FeatureExtractor(f"{USER_MODULE}:tiny_convnet", source="module", input_size=(3, 32, 32))
    assert module.spec.layer == "features" and module.spec.shape == (16, 8, 8)


def classifier_args(case: str, root: Path) -> list:
    """``create``'s classifier options for one case of the command-line test."""
    if case == "torchvision":
        return ["--source", "torchvision", "--classifier", "resnet18", "--layer", "layer3"]
    if case == "module":
        return ["--classifier-module", f"{USER_MODULE}:tiny_convnet", "--layer", "features.2"]
    folder = {"dinov2": dinov2_folder, "clip": clip_folder, "vit-classifier": vit_classifier_folder}[case](root)
    return ["--source", "transformers", "--classifier", folder]


@pytest.mark.parametrize("case", ["torchvision", "dinov2", "clip", "vit-classifier", "module"])
def test_create_train_reconstruct_on_the_command_line(capsys, tmp_path, image_files, monkeypatch, case):
    mark = tmp_path / "imported"
    monkeypatch.setenv("FEATINV_TEST_IMPORT_MARK", str(mark))
    classifier = classifier_args(case, tmp_path)
    size = [] if case in ("dinov2",) else ["--input-size", 32]
    made = tmp_path / "made"
    code, out, err = run_cli(capsys, "create", "--preset", "micro", *classifier, *size, "--out", made)
    assert code == 0, err
    spec = FeatureSpec.from_dict(json.loads((made / "featinv.json").read_text())["feature_spec"])
    assert spec.source == ("module" if case == "module" else classifier[1])
    code, out, _ = run_cli(capsys, "info", "--model", made)
    assert f"source:        {spec.source}" in out

    trust = ["--trust-code"] if case == "module" else []
    train = ["train", "--model", made, "--pool", 8, "--batch-size", 2, "--steps", 2, "--checkpoint-every", 0]
    code, out, err = run_cli(capsys, *train, *trust, "--out", tmp_path / "trained")
    assert code == 0, err
    trained = tmp_path / "trained" / "model"
    rec = ["reconstruct", "--model", trained, "--images", *image_files[:2], "--steps", 2, "--quiet"]
    code, out, err = run_cli(capsys, *rec, *trust, "--out", tmp_path / "rec")
    assert code == 0, err
    assert (tmp_path / "rec" / "grid.png").is_file() and len(list((tmp_path / "rec").glob("*.png"))) == 3

    if case == "module":  # without --trust-code, one line saying what would be imported; nothing imported
        mark.unlink()
        code, _, err = run_cli(capsys, *rec, "--out", tmp_path / "refused")
        assert_one_line_error(code, err, f"the classifier is the module {USER_MODULE}:tiny_convnet")
        assert "--trust-code" in err and not mark.exists() and not (tmp_path / "refused").exists()
    if case == "vit-classifier":  # class steering through ViTForImageClassification's head
        steer = ["steer", "--model", trained, "--class", 2, "--shapes", 1, "--strengths", "0,2", "--steps", 2]
        code, out, err = run_cli(capsys, *steer, "--out", tmp_path / "steer")
        assert code == 0, err
        assert "p(concept) by strength: 0:" in out


def test_bad_sources_are_one_line(capsys, tmp_path):
    from featinv.models import FeatInvModel

    common = ["create", "--preset", "micro", "--out", tmp_path / "m"]
    cases = [
        (["--source", "torchvision", "--classifier", "resnet181"], "unknown torchvision model 'resnet181'; did you"),
        (["--source", "module", "--classifier", "x"], "--source module needs --classifier-module"),
        (["--classifier-module", "nothing_here"], "--classifier-module must be package.module:factory or"),
        (["--classifier-module", f"{USER_MODULE}:missing"], "has no callable 'missing'"),
        (["--source", "transformers", "--classifier", tmp_path / "none"], "cannot read a transformers config from"),
        (["--source", "timm", "--classifier-module", "a:b"], "--classifier-module goes with --source module"),
    ]
    for args, pattern in cases:
        code, _, err = run_cli(capsys, *common, *args)
        assert_one_line_error(code, err, pattern)
    assert not (tmp_path / "m").exists()

    model = tmp_path / "model"
    code, _, err = run_cli(capsys, *common[:3], "--classifier", "resnet18", "--input-size", 32, "--out", model)
    assert code == 0, err
    config = json.loads((model / "featinv.json").read_text())
    config["feature_spec"]["source"] = "keras"
    (model / "featinv.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "info", "--model", model)
    assert_one_line_error(code, err, "feature_spec: source must be one of timm, torchvision, transformers, module")
    with pytest.raises(Exception, match="source must be one of"):
        FeatInvModel.from_pretrained(model)

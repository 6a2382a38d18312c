"""The analysis toolkit on tiny models and the shipped demo models: metrics (FID against scipy),
composition, steering, robustness probes, and the four commands with their bad-input errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, run_cli
from scipy import linalg

from featinv.analysis.compose import lerp, mix_by_mask, select_channels, slerp
from featinv.analysis.fid import frechet_distance, sqrtm_psd
from featinv.analysis.metrics import psnr, ssim, topk_agreement
from featinv.analysis.robustness import CORRUPTIONS, corrupt, ood_inputs
from featinv.analysis.steering import Concept, concept_activation_vector, steer
from featinv.errors import FeatInvError
from featinv.images import save_image


def test_matrix_square_root_matches_scipy():
    a = torch.randn(12, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    psd = a @ a.T
    ours = sqrtm_psd(psd).numpy()
    assert abs(ours - linalg.sqrtm(psd.numpy()).real).max() < 1e-8
    assert abs(ours @ ours - psd.numpy()).max() < 1e-8


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_the_shift():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(300, 8, generator=g)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    near, far = a + 0.1, torch.randn(300, 8, generator=g) * 2 + 1
    assert 0.05 < frechet_distance(a, near) < frechet_distance(a, far)
    with pytest.raises(FeatInvError, match="at least 2"):
        frechet_distance(a[:1], a)


@pytest.mark.parametrize(("n", "m", "dims"), [(40, 30, 64), (300, 200, 8)])  # fewer / more images than dims
def test_frechet_distance_equals_the_textbook_formula(n, m, dims):
    generator = torch.Generator().manual_seed(2)
    a = torch.randn(n, dims, generator=generator, dtype=torch.float64)
    b = torch.randn(m, dims, generator=generator, dtype=torch.float64) * 1.3 + 0.2
    cov_a, cov_b = np.cov(a.numpy().T), np.cov(b.numpy().T)
    cross = linalg.sqrtm(cov_a @ cov_b).real
    mean_term = float((a.mean(0) - b.mean(0)).pow(2).sum())
    expected = mean_term + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(cross)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_the_fid_difference_interval_sees_a_real_gap_and_holds_zero_without_one():
    from featinv.analysis.fid import fid_difference_interval

    generator = torch.Generator().manual_seed(0)
    real, a, b = (torch.randn(48, 16, generator=generator) for _ in range(3))
    low, high = fid_difference_interval(real, a, b + 1.0, resamples=100)
    assert low < high < 0  # a is nearer the real set than the shifted b
    low, high = fid_difference_interval(real, a, b, resamples=100)
    assert low < 0 < high  # the same distribution: no gap
    with pytest.raises(FeatInvError, match="a and b must embed the same images"):
        fid_difference_interval(real, a, b[:10])


def test_psnr_and_ssim_rank_degradations():
    clean = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    slight, heavy = corrupt(clean, "gaussian_noise", 1), corrupt(clean, "gaussian_noise", 5)
    assert bool((ssim(clean, clean) > 0.999).all()) and bool((psnr(clean, slight) > psnr(clean, heavy)).all())
    assert bool((ssim(clean, slight) > ssim(clean, heavy)).all())


def test_composition_endpoints_and_masks():
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(2, 8, 4, 4, generator=g), torch.rand(2, 8, 4, 4, generator=g) * 3
    for mix in (lerp, slerp):
        torch.testing.assert_close(mix(a, b, 0.0), a)
        torch.testing.assert_close(mix(a, b, 1.0), b)
    half = slerp(a, b, 0.5).flatten(1).norm(dim=1)
    torch.testing.assert_close(half, (a.flatten(1).norm(dim=1) + b.flatten(1).norm(dim=1)) / 2)
    mask = torch.zeros(16, 16)
    mask[:, 8:] = 1
    mixed = mix_by_mask(a, b, mask)
    assert torch.equal(mixed[..., :2], a[..., :2]) and torch.equal(mixed[..., 2:], b[..., 2:])
    kept, removed = select_channels(a, [0, 1], keep=True), select_channels(a, [0, 1], keep=False)
    torch.testing.assert_close(kept + removed, a)
    assert float(kept[:, 2:].abs().sum()) == 0.0
    with pytest.raises(FeatInvError, match="same shape"):
        lerp(a, b[:, :4], 0.5)


def test_cav_separates_concepts_and_steering_moves_along_it():
    g = torch.Generator().manual_seed(4)
    others = torch.rand(20, 6, 3, 3, generator=g)
    concept_maps = others.clone()
    concept_maps[:, 2] += 1.0  # the concept lives in channel 2
    concept = concept_activation_vector(concept_maps, others)
    assert int(concept.direction.abs().argmax()) == 2 and concept.direction[2] > 0
    steered = steer(others[:2], concept, [0.0, 0.5, 1.0])
    assert steered.shape == (3, 2, 6, 3, 3) and torch.equal(steered[0], others[:2])
    gains = [float(s[:, 2].mean() - others[:2, 2].mean()) for s in steered]
    assert gains[0] == 0.0 and 0 < gains[1] < gains[2]
    with pytest.raises(FeatInvError, match=r"strengths must be in \[-50, 50\]"):
        steer(others, concept, [0.0, 80.0])
    with pytest.raises(FeatInvError, match="a CAV needs"):
        concept_activation_vector(concept_maps[:0], others)
    assert isinstance(concept, Concept)


def test_corruptions_and_ood_inputs_stay_images():
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    for name in CORRUPTIONS:
        if name == "glass_blur":  # numba compiles it on first use: ~7 s, for one more of the 19
            continue
        out = corrupt(images, name, 3)
        assert out.shape == images.shape and float(out.min()) >= 0 and float(out.max()) <= 1
        assert not torch.equal(out, images), name
    assert all(v.shape == (2, 3, 16, 16) for v in ood_inputs(2, 16).values())
    with pytest.raises(FeatInvError, match="severity"):
        corrupt(images, "jpeg", 9)
    with pytest.raises(FeatInvError, match="at least 32x32 pixels"):
        corrupt(images[..., :16, :16], "jpeg", 3)


FAST = ["--steps", "2", "--opt-steps", "5", "--device", "cpu"]


@pytest.mark.heavy
def test_steer_compose_robustness_and_evaluate_write_their_reports(capsys, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    save_image(torch.rand(3, 32, 32), a)
    save_image(torch.rand(3, 32, 32), b)
    runs = {
        "steer": ["steer", "--class", 1, "--shapes", 2, "--strengths", "0,1"],
        "compose": ["compose", "--images", a, b, "--mode", "slerp", "--ts", "0,0.5,1"],
        "robustness": ["robustness", "--shapes", 2, "--corruptions", "jpeg,contrast"],
        "evaluate": ["evaluate", "--n", 6, "--guided-steps", 2],
    }
    expected = {
        "steer": {"strip.png", "probability.png"},
        "compose": {"originals.png", "grid.png"},
        "robustness": {"grid.png"},
        "evaluate": {"grid.png", "metrics.png"},
    }
    for name, args in runs.items():
        out = tmp_path / name
        code, printed, err = run_cli(capsys, *args, *FAST, "--out", out)
        assert code == 0, err
        assert {p.name for p in out.iterdir()} == expected[name] | {"metrics.json", "report.html"}
        assert "<img" in (out / "report.html").read_text()
        if name == "evaluate":  # a table: a row per metric, a column per method, intervals in brackets
            rows = {line.split()[0]: line for line in printed.splitlines() if line[:1].isalpha()}
            assert rows["feature_cosine"].count("[") == 5 and rows["fid_vs_real"].count("[") == 0
    evaluation = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert list(evaluation["methods"]) == ["featinv spatial", "featinv pooled", "optimisation", "guided", "hybrid"]
    assert {"feature_cosine", "top1_agreement", "fid_vs_real", "mask_iou"} <= set(evaluation["methods"]["optimisation"])
    for method, row in evaluation["ci95"].items():
        for name, (low, high) in row.items():
            assert low <= evaluation["methods"][method][name] <= high, (method, name)
    assert "95% CI" in evaluation["verdicts"][0] and "same images" in evaluation["verdicts"][0]
    low, high = evaluation["fid_spatial_minus_optimisation"]["ci95"]  # the classifier's space: small enough
    (fid_line,) = [line for line in evaluation["verdicts"] if "the optimisation baseline on FID" in line]
    assert low <= high and "images resampled" in fid_line
    assert any(line.startswith("Cost: guided sampling took") for line in evaluation["verdicts"])
    hybrid_lines = [line for line in evaluation["verdicts"] if line.startswith("Hybrid sampling")]
    assert len(hybrid_lines) == 5 and "spatial FeatInv on FID" in hybrid_lines[-1]  # four metrics and FID
    cost = evaluation["verdicts"][-1]
    assert cost.startswith("Cost: hybrid sampling took") and "x FeatInv's" in cost
    assert evaluation["hybrid_minus_spatial"]["feature_cosine"]["ci95"] is not None


def test_evaluate_verdicts_follow_the_paired_interval():
    from featinv.analysis.studies import _verdicts

    generator = torch.Generator().manual_seed(0)
    base = torch.rand(40, generator=generator)
    noise = 0.02 * torch.randn(40, generator=generator)
    verdicts = {}
    for lead in (0.05, 0.0, -0.05):
        per_image = {
            "featinv spatial": {"feature_cosine": base + lead + noise},
            "featinv pooled": {"feature_cosine": base},
            "optimisation": {"feature_cosine": base},
        }
        table = {
            name: {"feature_cosine": float(m["feature_cosine"].mean()), "fid_vs_real": 1.0}
            for name, m in per_image.items()
        }
        verdicts[lead] = _verdicts(table, per_image)[0]
    assert verdicts[0.05].startswith("Spatial FeatInv beats pooled on feature cosine")
    assert verdicts[0.0].startswith("Spatial FeatInv cannot be told apart from pooled")
    assert verdicts[-0.05].startswith("Spatial FeatInv does NOT beat pooled")
    table = {
        name: {"feature_cosine": 0.5, "fid_vs_real": fid}
        for name, fid in zip(per_image, (10.0, 20.0, 30.0), strict=True)
    }
    for interval, verdict in (((-15.0, -5.0), "beats"), ((-15.0, 5.0), "cannot be told apart from"), (None, "beats")):
        line = _verdicts(table, per_image, interval)[-1]
        assert line.startswith(f"Spatial FeatInv {verdict} the optimisation baseline on FID"), line


@pytest.mark.heavy
def test_analysis_commands_reject_bad_input(capsys, tmp_path, model_dir):  # noqa: F811
    (tmp_path / "empty").mkdir()
    (tmp_path / "others").mkdir()
    save_image(torch.rand(3, 32, 32), tmp_path / "others" / "x.png")
    small, big = tmp_path / "small.png", tmp_path / "big.png"
    save_image(torch.rand(3, 16, 16), small)
    save_image(torch.rand(3, 24, 24), big)
    cases = [
        (["steer", "--concept-dir", tmp_path / "empty", "--others-dir", tmp_path / "others"], "holds no images"),
        (["steer", "--class", 1, "--strengths", "0,100"], "strengths must be in [-50, 50]"),
        (["steer", "--class", 1, "--strengths", "0,abc"], "comma-separated"),
        (["steer", "--class", 99], "class index must be in [0, 5]"),
        (["compose", "--images", small, big], "same size"),
        (["robustness", "--eps", 2], "argument --eps: must be a number in [0, 1]"),
        (["evaluate", "--pooled-model", model_dir], "trained for"),
    ]
    for args, pattern in cases:
        code, _, err = run_cli(capsys, *args, *FAST, "--out", tmp_path / "never")
        assert_one_line_error(code, err, pattern)
        assert not (tmp_path / "never").exists()


def test_reconstruct_with_the_optimisation_method(capsys, tmp_path):
    from featinv.training.demo_preset import PRETRAINED, SPATIAL_DIR

    image = tmp_path / "in.png"
    save_image(torch.rand(3, 32, 32), image)
    code, out, err = run_cli(
        capsys,
        "reconstruct",
        "--model",
        PRETRAINED / SPATIAL_DIR,
        "--images",
        image,
        "--method",
        "optimize",
        "--opt-steps",
        5,
        "--device",
        "cpu",
        "--out",
        tmp_path / "o",
    )
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["grid.png", "in.png"]


def test_topk_agreement_with_fewer_classes_than_k():
    a = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    b = torch.tensor([[0.0, 0.0, 9.0], [0.0, 4.0, 1.0]])
    assert topk_agreement(a, b).tolist() == [False, True]
    assert topk_agreement(a, b, k=2).tolist() == [True, True]
    assert topk_agreement(a, b, k=5).tolist() == [True, True]  # 3 classes: all are in the top 5


def _random_fid_inception_weights() -> dict[str, torch.Tensor]:
    """Random weights of pytorch-fid's FID Inception (the real file cannot be downloaded here): the
    architecture and the formula are what the test checks."""
    from unittest import mock

    from pytorch_fid import inception as fid_inception

    torch.manual_seed(0)
    with (
        mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, *args, **kwargs: None),
        mock.patch.object(fid_inception, "load_state_dict_from_url", lambda *args, **kwargs: {}),
    ):
        return fid_inception.fid_inception_v3().state_dict()


@pytest.mark.heavy
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:Matrix is singular")  # pytorch-fid's scipy call
def test_inception_fid_equals_pytorch_fid_from_a_local_file(tmp_path):
    """featinv's FID in Inception space is pytorch-fid's: its network's pool features and its
    Frechet distance (pytorch_fid.fid_score.calculate_frechet_distance), from a local weights file."""
    import timm
    from pytorch_fid import fid_score
    from pytorch_fid import inception as fid_inception
    from safetensors.torch import save_file

    from featinv.analysis.fid import fid, inception_features

    pytest.importorskip("pytorch_fid")
    state = _random_fid_inception_weights()
    weights = tmp_path / "pt_inception.pth"
    torch.save(state, weights)
    features = inception_features(weights)
    generator = torch.Generator().manual_seed(1)
    real, fake = torch.rand(12, 3, 48, 48, generator=generator), torch.rand(12, 3, 48, 48, generator=generator) ** 2
    got_real, got_fake = features(real), features(fake)
    assert got_real.shape == (12, 2048)
    with mock_fid_weights(fid_inception, state):
        network = fid_inception.InceptionV3([3]).eval()
    with torch.no_grad():
        want_real, want_fake = (network(x)[0].flatten(1) for x in (real, fake))
    torch.testing.assert_close(got_real, want_real)
    torch.testing.assert_close(got_fake, want_fake)
    stats = [(x.double().numpy().mean(0), np.cov(x.double().numpy(), rowvar=False)) for x in (want_real, want_fake)]
    expected = fid_score.calculate_frechet_distance(*stats[0], *stats[1])
    assert fid(real, fake, features) == pytest.approx(expected, rel=1e-4)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "fid.safetensors"))
    torch.testing.assert_close(inception_features(tmp_path / "fid.safetensors")(real), got_real)  # safetensors too

    wrong = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(wrong))
    with pytest.raises(FeatInvError, match="do not fit pytorch-fid's InceptionV3"):
        inception_features(wrong)


def mock_fid_weights(fid_inception, state):
    from unittest import mock

    return mock.patch.object(fid_inception, "load_state_dict_from_url", lambda *args, **kwargs: state)


def test_ssim_is_the_standard_one_skimage_computes():
    """11x11 Gaussian window, sigma 1.5, population covariance, data range 1: scikit-image's SSIM."""
    from skimage.metrics import structural_similarity

    generator = torch.Generator().manual_seed(3)
    a = torch.rand(2, 3, 40, 36, generator=generator)
    b = (a + 0.2 * torch.randn(a.shape, generator=generator)).clamp(0, 1)
    got = ssim(a, b)
    for i in range(2):
        want = structural_similarity(
            a[i].permute(1, 2, 0).double().numpy(),
            b[i].permute(1, 2, 0).double().numpy(),
            channel_axis=2,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
        )
        assert float(got[i]) == pytest.approx(want, abs=5e-3)  # border handling differs by ~0.003


def test_corruptions_are_imagecorruptions_own():
    """Each corruption is the imagecorruptions package's output (numpy's generator seeded seed + i),
    and numpy's global generator is left as it was."""
    from imagecorruptions import corrupt as imagenet_c

    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for name in ("gaussian_noise", "motion_blur", "jpeg", "fog", "frost", "contrast"):
        np.random.seed(123)
        before = np.random.get_state()[1].copy()
        got = corrupt(images, name, 4, seed=7)
        assert np.array_equal(np.random.get_state()[1], before)  # the caller's generator, untouched
        for i in range(2):
            np.random.seed(7 + i)
            want = imagenet_c(pixels[i], corruption_name={"jpeg": "jpeg_compression"}.get(name, name), severity=4)
            want = torch.from_numpy(np.array(want, dtype=np.uint8)).permute(2, 0, 1).float() / 255
            torch.testing.assert_close(got[i], want, rtol=0, atol=0)


def test_evaluate_embeds_the_references_once(tmp_path, tiny_model, tiny_extractor):
    """The real images and the originals are embedded once for all methods (was once per method)."""
    from featinv.analysis.optimize import OptimizeConfig
    from featinv.analysis.studies import evaluate_study
    from featinv.pipeline import Reconstructor

    g = torch.Generator().manual_seed(0)
    images, real = torch.rand(3, 3, 16, 16, generator=g), torch.rand(5, 3, 16, 16, generator=g)  # the model's size
    seen = []

    def features(batch: torch.Tensor) -> torch.Tensor:
        seen.append(len(batch))
        return batch.mean((2, 3))

    spatial = Reconstructor(tiny_model, extractor=tiny_extractor)
    data = evaluate_study(
        spatial, None, images, real, tmp_path, steps=2, optimize=OptimizeConfig(steps=2), fid_features=features
    )
    assert sorted(seen) == [3, 3, 3, 5]  # two methods and the originals (3 images each), the real set once
    assert (
        set(data["methods"]) == {"featinv spatial", "optimisation"} and data["reference"]["fid_real_vs_originals"] >= 0
    )


def test_every_command_runs_the_optimisation_baseline_with_one_setting(capsys, monkeypatch, tmp_path):
    """At 224 px, evaluate (and steer, compose, robustness) used OptimizeConfig(steps=300), the setting
    that stalls there, while reconstruct --method optimize used the 224-px one: one setting now."""
    from conftest import make_model

    from featinv.analysis import optimize, studies
    from featinv.analysis.optimize import OptimizeConfig
    from featinv.features import FeatureExtractor
    from featinv.pipeline import Reconstructor

    seen = []

    def record(extractor, target, *, size=None, config=None, seed=0, progress=False):
        seen.append(config)
        return torch.zeros(len(target), 3, *(size or extractor.spec.input_size[1:]))

    monkeypatch.setattr(optimize, "invert_by_optimization", record)  # the registry's, for the CLI and studies
    kwargs = {"num_classes": 4, "layers": [1, 1, 1, 1], "channels": [8, 8, 8, 8]}
    extractor = FeatureExtractor("resnet18", "layer2", model_kwargs=kwargs, input_size=(3, 224, 224))
    image = tmp_path / "cat.png"
    save_image(torch.rand(3, 40, 40), image)
    layer = ["--layer", "layer2", "--input-size", "224", "--images", image, "--quiet"]
    code, _, err = run_cli(
        capsys, "reconstruct", "--method", "optimize", "--classifier", "resnet18", *layer, "--out", tmp_path / "r"
    )
    assert code == 0, err
    studies.make_inverter(Reconstructor(make_model(extractor)), "optimize")(extractor(torch.rand(1, 3, 224, 224)))
    assert seen[0] == seen[1] == OptimizeConfig.for_input(224) != OptimizeConfig(steps=300)


def test_one_registry_of_methods_refuses_what_each_cannot_run_with():
    from featinv.analysis.methods import REGISTRY, inversion_method
    from featinv.choices import METHODS

    assert tuple(REGISTRY) == METHODS
    with pytest.raises(FeatInvError, match="method must be one of featinv, optimize, guided, hybrid"):
        inversion_method("pixels")
    with pytest.raises(FeatInvError, match="--method hybrid runs on the eager backend"):
        inversion_method("hybrid").check(backend="compiled")
    with pytest.raises(FeatInvError, match="--method optimize runs no denoiser"):
        inversion_method("optimize").check(backend="onnx")
    with pytest.raises(FeatInvError, match="--guidance-on applies to --method featinv or hybrid, not --method guided"):
        inversion_method("guided").check(guidance=True)
    inversion_method("featinv").check(backend="tensorrt", guidance=True, classifier=False)
    with pytest.raises(FeatInvError, match="--method guided needs the classifier"):
        inversion_method("guided").check(classifier=False)

"""The paper's experiments as functions that write pictures, numbers and a report: concept steering,
feature composition, robustness and the evaluation of FeatInv against its baselines. The CLI
commands ``featinv steer|compose|robustness|evaluate`` are thin wrappers around these."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from featinv.analysis.compose import lerp, mix_by_mask, select_channels, slerp
from featinv.analysis.fid import classifier_features, embed_images, fid_difference_interval, frechet_distance
from featinv.analysis.guided import GuidanceConfig
from featinv.analysis.hybrid import HybridConfig
from featinv.analysis.intervals import difference_interval, mean_interval
from featinv.analysis.methods import InversionSettings, inversion_method
from featinv.analysis.metrics import classifier_outputs, reconstruction_metrics
from featinv.analysis.optimize import OptimizeConfig
from featinv.analysis.report import bar_plot, line_plot, write_report
from featinv.analysis.robustness import corrupt, ood_inputs, pgd_attack
from featinv.analysis.steering import Concept, steer
from featinv.errors import FeatInvError
from featinv.images import make_grid, save_image
from featinv.pipeline import Reconstructor

# The FID difference's interval costs 400 Frechet distances: cheap while the sets are no larger than
# the embedding is wide (an SVD of the (N, M) cross products) or the embedding is narrow.
FID_INTERVAL_MAX_DIM = 512
Inverter = Callable[[torch.Tensor], torch.Tensor]


def make_inverter(
    reconstructor: Reconstructor,
    method: str = "featinv",
    *,
    steps: int = 10,
    sampler: str = "dpmpp",
    seed: int = 0,
    optimize: OptimizeConfig | None = None,
    opt_steps: int | None = None,
    guided: GuidanceConfig | None = None,
    guidance: str | None = None,
    hybrid: HybridConfig | None = None,
) -> Inverter:
    """features (B, C, h, w) -> images (B, 3, H, W) by the registered ``method``
    (:mod:`featinv.analysis.methods`), on ``reconstructor``'s model and classifier, seeded ``seed``:
    FeatInv sampling, the optimisation baseline (at the model's image size), training-free guided
    sampling on the model's base (``guided`` settings), or FeatInv's sampling refined by feature
    guidance (``hybrid`` settings, default the model's). ``steps``, ``sampler`` and ``guidance``,
    what classifier-free guidance guides on, are FeatInv's and hybrid's; the baseline's settings are
    ``optimize``, by default :meth:`OptimizeConfig.for_extractor` with ``opt_steps``."""
    settings = InversionSettings(
        steps=steps,
        sampler=sampler,
        guidance=guidance,
        hybrid=hybrid,
        guided=guided,
        optimize=optimize,
        opt_steps=opt_steps,
        image_size=reconstructor.model.image_size,
    )
    invert = inversion_method(method).inverter(reconstructor, settings=settings)
    return lambda features: invert(features, seed=seed)


def _scale(images: torch.Tensor) -> int:
    return max(1, 96 // images.shape[-1])


def _predictions(reconstructor: Reconstructor, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return reconstructor.extractor.logits(images.to(reconstructor.device)).cpu()


def steer_study(
    reconstructor: Reconstructor,
    images: torch.Tensor,
    concept: Concept,
    strengths: list[float],
    out: Path,
    invert: Inverter,
    mask: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Reconstruct ``images``' maps steered along ``concept`` at each strength; plot the concept's
    probability on the reconstructions against the strength."""
    if len(strengths) < 2:
        raise FeatInvError(f"give at least two strengths, got {strengths}")
    features = reconstructor.features(images)
    steered = steer(features, concept, strengths, mask)  # (S, B, C, h, w)
    recon = invert(steered.flatten(0, 1)).view(len(strengths), len(images), *images.shape[1:])
    probability = concept.probability(reconstructor.extractor, recon.flatten(0, 1)).view(len(strengths), -1)
    out.mkdir(parents=True, exist_ok=True)
    save_image(make_grid([images, *recon], scale=_scale(images)), out / "strip.png")
    line_plot(
        out / "probability.png", strengths, {concept.name: probability.mean(1).tolist()}, "strength", "p(concept)"
    )
    table = {f"{s:g}": {"mean p(concept)": float(p.mean())} for s, p in zip(strengths, probability, strict=True)}
    data = {"concept": concept.name, "strengths": strengths, "probability": probability.tolist()}
    write_report(
        out,
        f"Steering toward {concept.name}",
        "Columns: original, then the reconstruction of its feature map moved along the concept direction "
        "by each strength (x the mean feature norm per position).",
        [("strip", "strip.png"), ("probability of the concept", "probability.png"), ("values", table)],
        data,
    )
    return data


def compose_study(
    reconstructor: Reconstructor,
    a: torch.Tensor,
    b: torch.Tensor,
    out: Path,
    invert: Inverter,
    *,
    mode: str = "lerp",
    ts: list[float] | None = None,
    mask: torch.Tensor | None = None,
    channels: list[int] | None = None,
) -> dict[str, Any]:
    """Reconstruct compositions of two images' maps (a, b: (1, 3, H, W)): a lerp/slerp series, a
    mask mix, or a channel group kept and removed."""
    fa, fb = reconstructor.features(a), reconstructor.features(b)
    if mode in ("lerp", "slerp"):
        ts = ts or [0.0, 0.25, 0.5, 0.75, 1.0]
        mix = lerp if mode == "lerp" else slerp
        labels, maps = [f"t={t:g}" for t in ts], [mix(fa, fb, t) for t in ts]
    elif mode == "mask":
        if mask is None:
            raise FeatInvError("mode mask needs --mask FILE")
        labels, maps = ["a", "a outside, b inside the mask", "b"], [fa, mix_by_mask(fa, fb, mask), fb]
    elif mode == "channels":
        if not channels:
            raise FeatInvError("mode channels needs --channels, e.g. 0-63")
        labels = ["a", "a, channels kept", "a, channels removed"]
        maps = [fa, select_channels(fa, channels, keep=True), select_channels(fa, channels, keep=False)]
    else:
        raise FeatInvError(f"mode must be lerp, slerp, mask or channels, got {mode!r}")
    recon = invert(torch.cat(maps))
    logits = _predictions(reconstructor, recon)
    class_a, class_b = (int(_predictions(reconstructor, x).argmax()) for x in (a, b))
    probs = logits.softmax(1)
    table = {
        label: {f"p(class {class_a} of a)": float(p[class_a]), f"p(class {class_b} of b)": float(p[class_b])}
        for label, p in zip(labels, probs, strict=True)
    }
    out.mkdir(parents=True, exist_ok=True)
    originals = make_grid([torch.cat([a, b])], scale=_scale(a))
    save_image(originals, out / "originals.png")
    save_image(make_grid([r[None] for r in recon], scale=_scale(a)), out / "grid.png")
    data = {"mode": mode, "labels": labels, "table": table}
    write_report(
        out,
        f"Composing feature maps ({mode})",
        "Top: images a and b. Below: reconstructions of the composed feature maps, left to right as in the table.",
        [("a and b", "originals.png"), ("reconstructions", "grid.png"), ("classifier on the reconstructions", table)],
        data,
    )
    return data


def robustness_study(
    reconstructor: Reconstructor,
    images: torch.Tensor,
    out: Path,
    invert: Inverter,
    *,
    eps: float = 4 / 255,
    pgd_steps: int = 10,
    corruptions: list[str] | None = None,
    severity: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """What the classifier sees in adversarial, corrupted and out-of-distribution inputs."""
    probes = {
        "clean": images,
        f"pgd eps={eps:.4f}": pgd_attack(reconstructor.extractor, images, eps=eps, steps=pgd_steps, seed=seed),
    }
    for name in corruptions if corruptions is not None else ["gaussian_noise", "gaussian_blur", "jpeg", "contrast"]:
        probes[name] = corrupt(images, name, severity, seed)
    size = images.shape[-1]
    probes |= {f"ood: {k}": v for k, v in ood_inputs(len(images), size, seed).items()}
    clean = _predictions(reconstructor, images).argmax(1)
    table, rows = {}, []
    for name, probe in probes.items():
        recon = invert(reconstructor.features(probe))
        seen, of_recon = _predictions(reconstructor, probe).argmax(1), _predictions(reconstructor, recon).argmax(1)
        table[name] = {
            "input_keeps_clean_class": float((seen == clean).float().mean()),
            "reconstruction_agrees_with_input": float((of_recon == seen).float().mean()),
            "input_classes_first_4": " ".join(map(str, seen[:4].tolist())),
        }
        rows.append(torch.stack([probe[0], recon[0]]))
    out.mkdir(parents=True, exist_ok=True)
    save_image(
        make_grid([torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])], scale=_scale(images)),
        out / "grid.png",
    )
    data = {"probes": list(probes), "table": table}
    write_report(
        out,
        "Robustness: what the classifier sees",
        "Each row of the grid: a probe of the first image (left) and the reconstruction of its feature map (right), "
        "in the table's order.",
        [("probes and reconstructions", "grid.png"), ("classifier", table)],
        data,
    )
    return data


def evaluate_study(
    spatial: Reconstructor,
    pooled: Reconstructor | None,
    images: torch.Tensor,
    real: torch.Tensor,
    out: Path,
    *,
    masks: torch.Tensor | None = None,
    steps: int = 10,
    sampler: str = "dpmpp",
    optimize: OptimizeConfig | None = None,
    opt_steps: int | None = None,
    guided: GuidanceConfig | None = None,
    seed: int = 0,
    fid_features: Callable[[torch.Tensor], torch.Tensor] | None = None,
    guidance: str | None = None,
    compare_guidance: str | None = None,
    hybrid: HybridConfig | None = None,
) -> dict[str, Any]:
    """FeatInv from spatial maps, FeatInv from pooled maps, the optimisation baseline, (with
    ``guided`` settings) training-free guided sampling on the base and (with ``hybrid`` settings)
    FeatInv's sampling refined by feature guidance, side by side: feature cosine,
    top-1 agreement, object location (with masks), FID against ``real`` images in the classifier's
    penultimate feature space (or ``fid_features``, e.g. Inception's), and each method's seconds
    per image in this run. ``guidance``: what FeatInv's classifier-free guidance guides on (default:
    each model's own); ``compare_guidance``: also FeatInv spatial guided on this one, and the paired
    differences of the two (``data["guidance_comparison"]``)."""
    extractor = spatial.extractor
    methods: dict[str, torch.Tensor] = {}
    seconds: dict[str, float] = {}

    def run(name: str, invert: Inverter, features: torch.Tensor) -> None:
        start = time.perf_counter()
        methods[name] = invert(features)
        seconds[name] = (time.perf_counter() - start) / len(features)

    maps = spatial.features(images)
    featinv_options = {"steps": steps, "sampler": sampler, "seed": seed, "guidance": guidance}
    run("featinv spatial", make_inverter(spatial, **featinv_options), maps)
    compared = None
    if compare_guidance is not None:
        compared = f"featinv spatial, guidance on {compare_guidance}"
        run(compared, make_inverter(spatial, **{**featinv_options, "guidance": compare_guidance}), maps)
    if pooled is not None:
        if not pooled.model.feature_spec.same_source(spatial.model.feature_spec):
            raise FeatInvError(
                f"the pooled model was trained for {pooled.model.feature_spec.describe()}, "
                f"the spatial one for {spatial.model.feature_spec.describe()}"
            )
        pooled_maps = pooled.features(images, pooled=True)
        run("featinv pooled", make_inverter(pooled, **featinv_options), pooled_maps)
    run("optimisation", make_inverter(spatial, "optimize", optimize=optimize, opt_steps=opt_steps, seed=seed), maps)
    if guided is not None:
        run("guided", make_inverter(spatial, "guided", guided=guided, seed=seed), maps)
    if hybrid is not None:
        run("hybrid", make_inverter(spatial, "hybrid", hybrid=hybrid, **featinv_options), maps)
    embed = fid_features or classifier_features(extractor)
    # What every method is compared with is computed once: the originals' classifier outputs, the
    # real images' embedding.
    originals = classifier_outputs(extractor, images)
    real_embedding = embed_images(real, embed)
    table, per_image, intervals, embeddings = {}, {}, {}, {}
    for name, recon in methods.items():
        metrics = reconstruction_metrics(extractor, images, recon, masks, original_outputs=originals)
        per_image[name] = metrics
        intervals[name] = {key: list(mean_interval(value)) for key, value in metrics.items()}
        means = {key: float(value.mean()) for key, value in metrics.items()}
        agreement = {
            key: means.pop(key)
            for key in ("feature_cosine", "pooled_feature_cosine", "top1_agreement", "top5_agreement")
            if key in means
        }
        embeddings[name] = embed_images(recon, embed)
        fid_vs_real = frechet_distance(real_embedding, embeddings[name])
        # the report's column order
        table[name] = {**agreement, "fid_vs_real": fid_vs_real, **means, "seconds_per_image": seconds[name]}
    reference = {"fid_real_vs_originals": frechet_distance(real_embedding, embed_images(images, embed))}
    out.mkdir(parents=True, exist_ok=True)
    shown = slice(0, min(12, len(images)))
    save_image(
        make_grid([images[shown], *(r[shown] for r in methods.values())], scale=_scale(images)), out / "grid.png"
    )
    headline = ("feature_cosine", "top1_agreement", "fid_vs_real", "mask_iou", "centroid_distance_px")
    metric_names = [name for name in headline if name in table["featinv spatial"]]
    bar_plot(out / "metrics.png", table, metric_names, intervals)
    # FID is one number per set: its verdict gets the bootstrap interval of the difference.
    fid_intervals: dict[str, tuple[float, float]] = {}
    width, largest = real_embedding.shape[1], max(len(real), len(images))
    if largest <= width or width <= FID_INTERVAL_MAX_DIM:
        for other in ("optimisation", "guided"):
            if other in embeddings:
                fid_intervals[other] = fid_difference_interval(
                    real_embedding, embeddings["featinv spatial"], embeddings[other], seed=seed
                )
        if "hybrid" in embeddings:  # hybrid minus spatial: lower is hybrid's lead
            fid_intervals["hybrid"] = fid_difference_interval(
                real_embedding, embeddings["hybrid"], embeddings["featinv spatial"], seed=seed
            )
    fid_interval = fid_intervals.get("optimisation")
    verdicts = _verdicts(table, per_image, fid_interval)
    comparison = None
    if compared is not None:
        fid_compared = None
        if largest <= width or width <= FID_INTERVAL_MAX_DIM:
            fid_compared = fid_difference_interval(
                real_embedding, embeddings[compared], embeddings["featinv spatial"], seed=seed
            )
        comparison = _paired_differences(table, per_image, compared, "featinv spatial", fid_compared)
    if "guided" in table:
        verdicts += _guided_verdicts(table, per_image, fid_intervals.get("guided"))
    if "hybrid" in table:
        verdicts += _hybrid_verdicts(table, per_image, fid_intervals.get("hybrid"))
    data = {
        "images": len(images),
        "real_images": len(real),
        "methods": table,
        "ci95": intervals,
        "fid_spatial_minus_optimisation": {
            "value": table["featinv spatial"]["fid_vs_real"] - table["optimisation"]["fid_vs_real"],
            "ci95": list(fid_interval) if fid_interval else None,
        },
        **(
            {
                "fid_spatial_minus_guided": {
                    "value": table["featinv spatial"]["fid_vs_real"] - table["guided"]["fid_vs_real"],
                    "ci95": list(fid_intervals["guided"]) if "guided" in fid_intervals else None,
                }
            }
            if "guided" in table
            else {}
        ),
        **(
            {
                "fid_hybrid_minus_spatial": {
                    "value": table["hybrid"]["fid_vs_real"] - table["featinv spatial"]["fid_vs_real"],
                    "ci95": list(fid_intervals["hybrid"]) if "hybrid" in fid_intervals else None,
                },
                "hybrid_minus_spatial": _paired_differences(
                    table, per_image, "hybrid", "featinv spatial", fid_intervals.get("hybrid")
                ),
            }
            if "hybrid" in table
            else {}
        ),
        "reference": reference,
        "verdicts": verdicts,
        **({"guidance_comparison": {"minus": "featinv spatial", "of": compared, **comparison}} if comparison else {}),
    }
    interval_table = {
        name: {key: f"[{low:.3f}, {high:.3f}]" for key, (low, high) in rows.items()} for name, rows in intervals.items()
    }
    write_report(
        out,
        "FeatInv evaluation",
        f"{len(images)} images; FID against {len(real)} other real images in "
        f"{'the given feature space' if fid_features else 'the classifier' + chr(39) + 's penultimate space'} "
        f"(real vs the originals themselves: {reference['fid_real_vs_originals']:.3f}). Grid columns: original, "
        + ", ".join(methods),
        [
            ("reconstructions", "grid.png"),
            ("metrics", table),
            ("95% confidence intervals of the means (Wilson's for rates, the bootstrap's otherwise)", interval_table),
            ("plots", "metrics.png"),
            ("what the numbers say", " ".join(verdicts)),
        ],
        data,
    )
    return data


def _paired_differences(
    table: dict[str, dict[str, float]],
    per_image: dict[str, dict[str, torch.Tensor]],
    a: str,
    b: str,
    fid_interval: tuple[float, float] | None,
) -> dict[str, dict[str, Any]]:
    """Method ``a`` minus method ``b`` on every per-image metric (the mean difference and its paired
    bootstrap interval) and on FID (with ``fid_interval`` when it could be computed)."""
    differences = {}
    for key, values in per_image[a].items():
        if key in per_image[b] and values.numel() > 1:
            first, second = values.float(), per_image[b][key].float()
            low, high = difference_interval(first, second)
            differences[key] = {"value": float((first - second).mean()), "ci95": [low, high]}
    fid = table[a]["fid_vs_real"] - table[b]["fid_vs_real"]
    differences["fid_vs_real"] = {"value": fid, "ci95": list(fid_interval) if fid_interval else None}
    return differences


def _verdicts(
    table: dict[str, dict[str, float]],
    per_image: dict[str, dict[str, torch.Tensor]],
    fid_interval: tuple[float, float] | None = None,
) -> list[str]:
    """Plain sentences: does spatial FeatInv beat pooled on cosine and location (judged by the paired
    95% interval of the difference, per image), and optimisation on FID (by ``fid_interval``, the
    interval of FID(spatial) - FID(optimisation), when there is one)?"""
    spatial = table["featinv spatial"]
    lines = []
    if "featinv pooled" in table:
        pooled = table["featinv pooled"]
        for key, what in (("feature_cosine", "feature cosine"), ("mask_iou", "object location (mask IoU)")):
            if key not in spatial:
                continue
            low, high = difference_interval(per_image["featinv spatial"][key], per_image["featinv pooled"][key])
            verdict = _verdict(low, high)
            lines.append(
                f"Spatial FeatInv {verdict} pooled on {what}: {spatial[key]:.3f} vs {pooled[key]:.3f}, "
                f"difference {spatial[key] - pooled[key]:.3f} (95% CI [{low:.3f}, {high:.3f}], same images)."
            )
    optimisation = table["optimisation"]
    lines.append(
        _fid_line(table, "optimisation", "the optimisation baseline", fid_interval)
        + f"; the baseline matches features by construction (cosine {optimisation['feature_cosine']:.3f})."
    )
    return lines


def _fid_line(table: dict[str, dict[str, float]], other: str, label: str, interval: tuple[float, float] | None) -> str:
    """Spatial FeatInv against ``other`` on FID, judged by ``interval`` (of FID(spatial) - FID(other))."""
    return _fid_verdict(table, ("featinv spatial", "Spatial FeatInv"), (other, label), interval)


def _fid_verdict(
    table: dict[str, dict[str, float]],
    first: tuple[str, str],
    second: tuple[str, str],
    interval: tuple[float, float] | None,
) -> str:
    """Method ``first`` against ``second`` ((name, label in a sentence) each) on FID, judged by
    ``interval`` (of FID(first) - FID(second)); lower FID is better."""
    (a, label_a), (b, label_b) = first, second
    fid_a, fid_b = table[a]["fid_vs_real"], table[b]["fid_vs_real"]
    difference = fid_a - fid_b
    if interval is None:
        verdict, evidence = ("beats" if difference < 0 else "does NOT beat"), "no interval in this space"
    else:
        low, high = interval
        verdict = _verdict(-high, -low)
        evidence = f"difference {difference:.3f}, 95% CI [{low:.3f}, {high:.3f}], images resampled"
    return f"{label_a} {verdict} {label_b} on FID ({fid_a:.3f} vs {fid_b:.3f}; {evidence})"


GUIDED_METRICS = (
    ("feature_cosine", "feature cosine", True),
    ("top1_agreement", "top-1 agreement", True),
    ("mask_iou", "object location (mask IoU)", True),
    ("centroid_distance_px", "centroid distance (px, lower is better)", False),
)


def _guided_verdicts(
    table: dict[str, dict[str, float]],
    per_image: dict[str, dict[str, torch.Tensor]],
    fid_interval: tuple[float, float] | None,
) -> list[str]:
    """Spatial FeatInv against training-free guided sampling, metric by metric (paired 95%
    intervals of the per-image differences), on FID, and what each costs per image."""
    lines = _comparison(table, per_image, ("featinv spatial", "Spatial FeatInv"), ("guided", "guided sampling"))
    lines.append(_fid_line(table, "guided", "guided sampling", fid_interval) + ".")
    spatial, guided = table["featinv spatial"], table["guided"]
    ratio = guided["seconds_per_image"] / max(spatial["seconds_per_image"], 1e-9)
    lines.append(
        f"Cost: guided sampling took {guided['seconds_per_image']:.3f} s per image, {ratio:.1f}x FeatInv's "
        f"{spatial['seconds_per_image']:.3f} s in this run (a backward pass through the UNet, decoder and "
        "classifier per step), with no training; FeatInv needs a ControlNet trained for the classifier and layer."
    )
    return lines


def _hybrid_verdicts(
    table: dict[str, dict[str, float]],
    per_image: dict[str, dict[str, torch.Tensor]],
    fid_interval: tuple[float, float] | None,
) -> list[str]:
    """Hybrid sampling against spatial FeatInv (the sampling it refines), metric by metric (paired
    95% intervals), on FID (``fid_interval``: of FID(hybrid) - FID(spatial)), and its cost."""
    lines = _comparison(table, per_image, ("hybrid", "Hybrid sampling"), ("featinv spatial", "spatial FeatInv"))
    lines.append(
        _fid_verdict(table, ("hybrid", "Hybrid sampling"), ("featinv spatial", "spatial FeatInv"), fid_interval) + "."
    )
    seconds, base = table["hybrid"]["seconds_per_image"], table["featinv spatial"]["seconds_per_image"]
    lines.append(
        f"Cost: hybrid sampling took {seconds:.3f} s per image, {seconds / max(base, 1e-9):.1f}x FeatInv's "
        f"{base:.3f} s in this run (per guided step a backward pass through the ControlNet, the UNet's guidance "
        "branches, the decoder and the classifier), on the same trained model."
    )
    return lines


def _comparison(
    table: dict[str, dict[str, float]],
    per_image: dict[str, dict[str, torch.Tensor]],
    first: tuple[str, str],
    second: tuple[str, str],
) -> list[str]:
    """Method ``first`` against ``second`` ((name, label in a sentence) each) on the headline
    per-image metrics: the verdict of the paired 95% interval of the differences."""
    (a, label_a), (b, label_b) = first, second
    lines = []
    for key, what, higher_is_better in GUIDED_METRICS:
        if key not in table[a]:
            continue
        low, high = difference_interval(per_image[a][key], per_image[b][key])
        verdict = _verdict(low, high) if higher_is_better else _verdict(-high, -low)
        lines.append(
            f"{label_a} {verdict} {label_b} on {what}: {table[a][key]:.3f} vs {table[b][key]:.3f}, "
            f"difference {table[a][key] - table[b][key]:.3f} (95% CI [{low:.3f}, {high:.3f}], same images)."
        )
    return lines


def _verdict(low: float, high: float) -> str:
    """Spatial FeatInv against another method, given the interval of a difference where higher is
    better for spatial: a lead only when the interval excludes 0."""
    return "beats" if low > 0 else "does NOT beat" if high < 0 else "cannot be told apart from"

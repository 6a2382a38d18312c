"""The built-in default: invert a small classifier's feature maps on held-out ``shapes`` images
with the shipped tiny FeatInv models, from spatial and from pooled features, and measure both."""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from featinv.analysis.intervals import difference_interval, format_interval, mean_interval
from featinv.analysis.metrics import reconstruction_metrics
from featinv.analysis.report import bar_plot
from featinv.data.shapes import DEMO_SEED, generate_shapes
from featinv.distributed import gather, is_main_process, process_state, shard
from featinv.errors import FeatInvError
from featinv.images import make_grid, save_image
from featinv.models.featinv_model import FeatInvModel
from featinv.paths import ARCHITECTURES, PRETRAINED, REALTIME_DIR
from featinv.pipeline import DEFAULT_GUIDANCE, Reconstructor, resolve_device

DEMO_SAMPLER, DEMO_STEPS = "dpmpp", 10
REALTIME_STEP_CHOICES = (1, 2, 4)


def _load(root: Path, name: str) -> FeatInvModel:
    path = root / name
    if not path.is_dir():
        raise FeatInvError(f"shipped demo model {path} not found; train it with 'featinv train --preset shapes-demo'")
    return FeatInvModel.from_pretrained(path)


def _per_image(
    reconstructor: Reconstructor, originals: torch.Tensor, masks: torch.Tensor, images: torch.Tensor
) -> torch.Tensor:
    """(N, 4) per-image metrics in METRICS order; averaged after the processes' shares are merged."""
    values = reconstruction_metrics(reconstructor.extractor, originals, images, masks)
    return torch.stack([values[name] for name in METRICS], dim=1)


METRICS = ("top1_agreement", "feature_cosine", "mask_iou", "centroid_distance_px")
LABELS = ("top-1 agreement", "feature cosine", "mask IoU", "centroid distance (px)")


@dataclass(frozen=True)
class DemoOptions:
    """How the demo runs, the same for every classifier family: the device, the number of held-out
    images ``n``, the sampler and its steps, where the shipped models are, the batch size."""

    device: str = "auto"
    n: int = 200
    steps: int = DEMO_STEPS
    sampler: str = DEMO_SAMPLER
    model_root: str | Path = PRETRAINED
    batch_size: int = 50

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise FeatInvError(f"n must be a positive number of images, got {self.n!r}")


def run_demo(
    out: str | Path = "demo-out",
    options: DemoOptions | None = None,
    *,
    realtime_steps: int | None = None,
    classifier: str = "convnext",
) -> dict[str, Any]:
    """Run the demo; write ``grid.png``, ``metrics.png``, ``metrics.json`` and ``report.html`` into ``out``.

    ``options``: :class:`DemoOptions` (the defaults when None). ``classifier``: whose shipped
    inverters (``featinv.paths.ARCHITECTURES``; convnext, the default). ``realtime_steps`` (1, 2
    or 4; ConvNeXt only): also reconstruct with the distilled model in that many steps of its
    few-step sampler, beside the teacher (``spatial``) in the same run; each mode's seconds per
    image are recorded."""
    return _run(out, options or DemoOptions(), classifier, realtime_steps)[0]


def check_realtime(classifier: str, realtime_steps: int) -> None:
    """Refuse a real-time run the shipped models cannot do: the distilled model is ConvNeXt's, in
    1, 2 or 4 steps."""
    if classifier != "convnext":
        raise FeatInvError(
            f"the real-time model is ConvNeXt's: --realtime goes with --classifier convnext only, got {classifier!r}"
        )
    if realtime_steps not in REALTIME_STEP_CHOICES:
        raise FeatInvError(f"realtime steps must be one of 1, 2, 4, got {realtime_steps!r}")


def _run(
    out: str | Path, options: DemoOptions, classifier: str, realtime_steps: int | None
) -> tuple[dict[str, Any], list[torch.Tensor] | None]:
    """:func:`run_demo`, also returning the pictures shown in the grid (original first, then each
    mode's reconstructions, (12, 3, S, S) each) on the main process (None on the others)."""
    if classifier not in ARCHITECTURES:
        raise FeatInvError(f"classifier must be one of {', '.join(ARCHITECTURES)}, got {classifier!r}")
    n, steps, sampler = options.n, options.steps, options.sampler
    start = time.perf_counter()
    out, model_root = Path(out), Path(options.model_root)
    device = resolve_device(options.device)
    spatial_dir, pooled_dir = ARCHITECTURES[classifier]
    spatial = Reconstructor(_load(model_root, spatial_dir), device=device)
    pooled = Reconstructor(_load(model_root, pooled_dir), device=device)
    modes = {"spatial": (spatial, {}), "pooled": (pooled, {})}
    if realtime_steps is not None:
        check_realtime(classifier, realtime_steps)
        realtime = Reconstructor(_load(model_root, REALTIME_DIR), device=device)
        modes["realtime"] = (realtime, {"steps": realtime_steps, "sampler": None})
    data = generate_shapes(n, DEMO_SEED)
    # Under accelerate launch / torchrun each process takes a share; the results are merged.
    first, rows = shard(range(n))
    mine = slice(first, first + len(rows))
    kwargs = {"steps": steps, "sampler": sampler, "seed": 0, "first_index": first, "batch_size": options.batch_size}
    shares = []
    if rows:
        share: dict[str, Any] = {"seconds": {}}
        shown = []
        for mode, (reconstructor, options) in modes.items():
            started = time.perf_counter()
            images = reconstructor.reconstruct(data.images[mine], **{**kwargs, **options}).images
            share["seconds"][mode] = time.perf_counter() - started
            share[mode] = _per_image(spatial, data.images[mine], data.masks[mine], images)
            shown.append(images[:12])
        share["shown"] = shown if first == 0 else None
        shares.append(share)
    shares = gather(shares)
    metrics: dict[str, Any] = {
        "classifier": spatial.model.feature_spec.describe(),
        "images": n,
        "held_out_seed": DEMO_SEED,
        "sampler": sampler,
        "steps": steps,
        "guidance_scale": DEFAULT_GUIDANCE,
        "device": str(device),
        "processes": process_state().num_processes,
    }
    # Per image (n, len(METRICS)), both modes in the same image order: means, their 95% intervals,
    # and the paired interval of the difference (featinv.analysis.intervals).
    per_image = {mode: torch.cat([share[mode] for share in shares]) for mode in modes}
    metrics["seconds_per_image"] = {mode: sum(s["seconds"][mode] for s in shares) / n for mode in modes}
    if realtime_steps is not None:
        metrics["realtime_steps"] = realtime_steps
        metrics["realtime_sampler"] = realtime.model.few_step_sampler
        metrics["realtime_minus_spatial"] = {
            name: {
                "mean": float((per_image["realtime"][:, i] - per_image["spatial"][:, i]).mean()),
                "ci95": list(difference_interval(per_image["realtime"][:, i], per_image["spatial"][:, i])),
            }
            for i, name in enumerate(METRICS)
        }
    metrics["ci95"] = {}
    for mode, values in per_image.items():
        metrics[mode] = {name: float(v) for name, v in zip(METRICS, values.mean(0), strict=True)}
        metrics["ci95"][mode] = {name: list(mean_interval(values[:, i])) for i, name in enumerate(METRICS)}
    metrics["spatial_minus_pooled"] = {
        name: {
            "mean": metrics["spatial"][name] - metrics["pooled"][name],
            "ci95": list(difference_interval(per_image["spatial"][:, i], per_image["pooled"][:, i])),
        }
        for i, name in enumerate(METRICS)
    }
    if not is_main_process():
        return metrics, None
    shown = next(share["shown"] for share in shares if share["shown"] is not None)
    columns = [data.images[: len(shown[0])], *shown]
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    out.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(columns, scale=4), out / "grid.png")
    labels = {mode: _mode_label(metrics, mode) for mode in modes}
    bar_plot(
        out / "metrics.png",
        {labels[mode]: metrics[mode] for mode in modes},
        METRICS,
        {labels[mode]: metrics["ci95"][mode] for mode in modes},
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "report.html").write_text(_report(metrics))
    return metrics, columns


def run_architectures(out: str | Path = "demo-out", options: DemoOptions | None = None) -> dict[str, Any]:
    """The demo for every classifier family in one run (``featinv demo --classifier all``): each
    family's full demo in ``out/<family>/``, then ``out/architectures.json`` (each family's metrics)
    and ``out/grid.png`` (original | each family's spatial reconstructions of the same images)."""
    out, options = Path(out), options or DemoOptions()
    start = time.perf_counter()
    results, spatial_columns, originals = {}, [], None
    for family in ARCHITECTURES:
        metrics, columns = _run(out / family, options, family, None)
        results[family] = metrics
        if columns is not None:
            originals = columns[0]
            spatial_columns.append(columns[1])
    if not is_main_process():
        return results
    save_image(make_grid([originals, *spatial_columns], scale=4), out / "grid.png")
    results["seconds"] = round(time.perf_counter() - start, 1)
    (out / "architectures.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def architecture_table(results: dict[str, Any]) -> list[list[str]]:
    """Text cells, header first: a row per family and metric with spatial, pooled and spatial - pooled
    (means with their 95% intervals, as :func:`metric_table`)."""
    rows = [["classifier", "metric", "spatial features", "pooled features", "spatial - pooled"]]
    for family in ARCHITECTURES:
        metrics = results[family]
        for i, row in enumerate(metric_table(metrics)[: len(METRICS)]):
            rows.append([metrics["classifier"] if i == 0 else "", *row])
    return rows


def _mode_label(metrics: dict[str, Any], mode: str) -> str:
    if mode == "realtime":
        return f"real-time ({metrics['realtime_steps']} {metrics.get('realtime_sampler', 'lcm')} steps)"
    return f"{mode} features"


def metric_header(metrics: dict[str, Any]) -> list[str]:
    """The columns of :func:`metric_table`."""
    header = ["metric", "spatial features", "pooled features", "spatial - pooled"]
    if "realtime" in metrics:
        header += [_mode_label(metrics, "realtime"), "real-time - spatial"]
    return header


def metric_table(metrics: dict[str, Any]) -> list[list[str]]:
    """The headline table as text cells: a row per metric (label, spatial, pooled, spatial - pooled,
    and with the real-time mode: real-time, real-time - spatial), each a mean with its 95% interval,
    and a last row of seconds per image."""
    rows = []
    for name, label in zip(METRICS, LABELS, strict=True):
        cells = [format_interval(metrics[mode][name], metrics["ci95"][mode][name]) for mode in ("spatial", "pooled")]
        difference = metrics["spatial_minus_pooled"][name]
        row = [label, *cells, format_interval(difference["mean"], difference["ci95"])]
        if "realtime" in metrics:
            faster = metrics["realtime_minus_spatial"][name]
            row += [
                format_interval(metrics["realtime"][name], metrics["ci95"]["realtime"][name]),
                format_interval(faster["mean"], faster["ci95"]),
            ]
        rows.append(row)
    seconds = metrics["seconds_per_image"]
    row = ["seconds per image", f"{seconds['spatial']:.3f}", f"{seconds['pooled']:.3f}", ""]
    if "realtime" in metrics:
        row += [f"{seconds['realtime']:.3f}", f"{seconds['realtime'] / seconds['spatial']:.2f}x"]
    rows.append(row)
    return rows


def _report(metrics: dict[str, Any]) -> str:
    header = "".join(f"<th>{html.escape(cell)}</th>" for cell in metric_header(metrics))
    columns = " | ".join(["original", *(_mode_label(metrics, mode) for mode in metrics["seconds_per_image"])])
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in metric_table(metrics)
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>featinv demo</title>
<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto}}td,th{{padding:4px 12px}}</style></head>
<body><h1>featinv demo: what a small classifier sees</h1>
<p>{metrics["images"]} held-out <code>shapes</code> images (seed {metrics["held_out_seed"]}), reconstructed
from the feature map of {html.escape(metrics["classifier"])} with {html.escape(metrics["sampler"])},
{metrics["steps"]} steps,
guidance {metrics["guidance_scale"]}, on {html.escape(metrics["device"])} in {metrics["seconds"]} s.</p>
<table border="1" cellspacing="0"><tr>{header}</tr>
{rows}</table>
<p>Each figure is a mean over the images with its 95% confidence interval in brackets: Wilson's for top-1
agreement (a rate), the bootstrap's otherwise; the difference's interval is a paired bootstrap (the same
images resampled for both). An interval that excludes 0 is a difference this sample can vouch for.</p>
<img src="metrics.png" width="880">
<p>Top-1 agreement: the classifier gives the reconstruction the original's class. Feature cosine: between the
feature maps of reconstruction and original. Location: the reconstruction's object mask by colour (pixels nearer
the original object's colour than its background's) against the true mask.</p>
<h2>{html.escape(columns)}</h2><img src="grid.png"></body></html>
"""

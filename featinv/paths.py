"""Where the shipped demo models live: plain paths, importable without torch (the CLI's --help
shows them as defaults)."""

from __future__ import annotations

from pathlib import Path

PRETRAINED = Path(__file__).resolve().parent / "pretrained"
SPATIAL_DIR, POOLED_DIR = "shapes-demo", "shapes-demo-pooled"
REALTIME_DIR = "shapes-demo-realtime"  # the spatial model distilled to 4 steps, guidance folded in
BASE_DIR = "shapes-base"  # the base UNet the demo models refer to

# The shipped inverters of each classifier family, all on the one base: (spatial, pooled) folders.
ARCHITECTURES = {
    "convnext": (SPATIAL_DIR, POOLED_DIR),
    "resnet": ("shapes-resnet", "shapes-resnet-pooled"),
    "vit": ("shapes-vit", "shapes-vit-pooled"),
}

"""``featinv demo``: the built-in default on the shipped tiny models (the demo itself is
:mod:`featinv.demo`), for one classifier family or, with ``--classifier all``, each in turn."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from featinv.limits import arg
from featinv.paths import ARCHITECTURES

if TYPE_CHECKING:
    from featinv.demo import DemoOptions


def cmd_demo(args: argparse.Namespace) -> int:
    """The built-in default: reconstruct held-out shapes images from spatial and pooled features."""
    from featinv.analysis.report import text_table
    from featinv.demo import DemoOptions, check_realtime, metric_header, metric_table, run_demo

    realtime = args.realtime_steps if args.realtime else None
    if realtime is not None:
        check_realtime(args.classifier, realtime)
    options = DemoOptions(device=args.device, n=args.n, steps=args.steps)
    if args.classifier == "all":
        return _demo_architectures(args, options)
    metrics = run_demo(args.out, options, realtime_steps=realtime, classifier=args.classifier)
    if "seconds" not in metrics:  # another process of a multi-process run: the main one reports
        return 0
    print(f"{metrics['images']} held-out images; mean [95% confidence interval]")
    print(text_table([["", *metric_header(metrics)[1:]], *metric_table(metrics)]))
    print(f"wrote grid.png, metrics.png, metrics.json and report.html to {args.out} ({metrics['seconds']} s)")
    return 0


def _demo_architectures(args: argparse.Namespace, options: DemoOptions) -> int:
    """``featinv demo --classifier all``: every family's demo, then the cross-architecture table."""
    from featinv.analysis.report import text_table
    from featinv.demo import architecture_table, run_architectures

    results = run_architectures(args.out, options)
    if "seconds" not in results:
        return 0
    print(f"{args.n} held-out images; mean [95% confidence interval]")
    print(text_table(architecture_table(results)))
    print(
        f"wrote grid.png (original | {' | '.join(ARCHITECTURES)}, spatial) and architectures.json to {args.out}, "
        f"and each classifier's demo in {args.out}/<classifier>/ ({results['seconds']} s)"
    )
    return 0


def add_demo_command(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="the built-in default on the shipped tiny models")
    demo.add_argument("--out", default="demo-out")
    demo.add_argument("--device", default="auto", help="auto, cpu or cuda")
    demo.add_argument(
        "--n", "--num-images", dest="n", type=arg("images"), default=200, help="held-out images (default 200)"
    )
    demo.add_argument("--steps", type=arg("steps"), default=10, help="DPM-Solver++ steps (default 10)")
    demo.add_argument(
        "--realtime",
        action="store_true",
        help="also the distilled model (shapes-demo-realtime) in --realtime-steps of its sampler, no guidance",
    )
    demo.add_argument(
        "--realtime-steps", type=arg("few_steps"), choices=[1, 2, 4], default=4, help="with --realtime (default 4)"
    )
    demo.add_argument(
        "--classifier",
        choices=[*ARCHITECTURES, "all"],
        default="convnext",
        help="whose shipped inverters (default convnext); all: each in turn, then the cross-architecture table",
    )
    demo.set_defaults(func=cmd_demo)

"""Start-up of the CLI against importing torch, side by side in one run: the median wall time of
``featinv --help`` (and ``featinv reconstruct --help``) over fresh interpreters, and its ratio to
``python -c "import torch"``. The CLI's help imports no torch, timm or diffusers, so it should take
well under half of torch's import.

    python benchmarks/bench_startup.py [--runs 5] [--out startup.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "featinv --help": [sys.executable, "-m", "featinv.cli", "--help"],
    "featinv reconstruct --help": [sys.executable, "-m", "featinv.cli", "reconstruct", "--help"],
    "import featinv": [sys.executable, "-c", "import featinv"],
}


def median_seconds(command: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args()
    subprocess.run(COMMANDS["import torch"], check=True)  # warm the file cache once for all
    seconds = {name: median_seconds(command, args.runs) for name, command in COMMANDS.items()}
    base = seconds["import torch"]
    for name, value in seconds.items():
        print(f"{name:<28} {value:6.3f} s   {value / base:5.2f}x of import torch")
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": args.runs, "seconds": seconds}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""The web app's latency as a user meets it: ``featinv serve`` started in a process of its own, one
backend after another in one run, then a slider dragged through a sweep of steering strengths.

For each backend: the start-up time (process start until the page's API answers: loading, compiling,
warming up both models), and each slider move's time from request to pictures (three seeds, the
server's steps, the picture encoding), median and worst, first on the spatial model, then the same
sweep on the pooled one. Ratios are against the first backend listed. Writes JSON with ``--out``.

    python benchmarks/bench_webapp.py --backends eager compiled --device cpu
    python benchmarks/bench_webapp.py --backends eager fast --device cuda      # on a GPU
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def _post(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body or {}).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(backend: str, device: str, strengths: list[float], extra: list[str]) -> dict:
    """Start ``featinv serve`` on ``backend``, time its start-up and a slider sweep on each model."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api/"
    command = [sys.executable, "-m", "featinv.cli", "serve", "--port", str(port), "--device", device]
    command += ["--backend", backend, *extra]
    with tempfile.TemporaryFile("w+") as log:
        started = time.perf_counter()
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            while True:
                try:
                    info = json.load(urllib.request.urlopen(url + "info", timeout=5))
                    break
                except OSError:
                    if server.poll() is not None:
                        log.seek(0)
                        raise RuntimeError(f"featinv serve --backend {backend} ended:\n{log.read()[-2000:]}") from None
                    time.sleep(0.1)
            row = {"backend": backend, "device": device, "startup_s": time.perf_counter() - started}
            image = _post(url + "example/0")["id"]
            for mode in info["modes"]:
                seconds = []
                for strength in strengths:
                    begin = time.perf_counter()
                    result = _post(url + "reconstruct", {"id": image, "strength": strength, "mode": mode})
                    seconds.append(time.perf_counter() - begin)
                    assert len(result["images"]) == info["seeds"], result
                row[mode] = {"median_s": statistics.median(seconds), "worst_s": max(seconds), "moves": len(seconds)}
            return row
        finally:
            server.terminate()
            server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["eager", "compiled"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--moves", type=int, default=11, help="slider positions per model (default 11)")
    parser.add_argument("--out", help="JSON file to write")
    parser.add_argument("serve_args", nargs="*", help="more arguments for featinv serve, after --")
    args = parser.parse_args()
    strengths = [round(-0.5 + 2.0 * i / max(args.moves - 1, 1), 3) for i in range(args.moves)]
    rows = []
    for backend in args.backends:
        try:
            rows.append(measure(backend, args.device, strengths, args.serve_args))
        except (RuntimeError, urllib.error.URLError) as error:  # recorded, the run goes on
            rows.append({"backend": backend, "device": args.device, "error": str(error)})
        print(json.dumps(rows[-1]), flush=True)
    base, nan = rows[0], float("nan")
    print(
        f"\n{'backend':<10} {'start-up':>9} {'spatial median':>15} {'worst':>7} {'pooled median':>14} {'vs first':>9}"
    )
    for row in rows:
        if "error" in row:
            print(f"{row['backend']:<10} failed: {row['error'].splitlines()[0]}")
            continue
        spatial, pooled = row.get("spatial", {}), row.get("pooled", {})
        ratio = base["spatial"]["median_s"] / spatial["median_s"] if "spatial" in base and spatial else nan
        cells = (spatial.get("median_s", nan), spatial.get("worst_s", nan), pooled.get("median_s", nan))
        print(
            f"{row['backend']:<10} {row['startup_s']:>8.1f}s {cells[0]:>14.3f}s {cells[1]:>6.3f}s "
            f"{cells[2]:>13.3f}s {ratio:>8.2f}x"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"strengths": strengths, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

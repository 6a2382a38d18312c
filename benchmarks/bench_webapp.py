"""The web app's latency as a user meets it: ``featinv serve`` started in a process of its own, one
backend after another in one run, then a slider dragged through a sweep of steering strengths.

For each backend: the start-up time (process start until the page's API answers: loading, compiling,
warming up both models), and each slider move's time from request to pictures (three seeds, the
server's steps, the picture encoding), median and worst, first on the spatial model, then the same
sweep on the pooled one. Ratios are against the first backend listed. Writes JSON with ``--out``.

    python benchmarks/bench_webapp.py --backends eager compiled --device cpu
    python benchmarks/bench_webapp.py --backends eager fast --device cuda      # on a GPU

With ``--realtime``: the default server (10 DPM-Solver++ steps with guidance) against the real-time
mode (``featinv serve --realtime``: the distilled model, 4 steps, no guidance), both eager, in one
run; the spatial slider's rate is what the real-time mode is for.

    python benchmarks/bench_webapp.py --realtime --device cpu

With ``--clients N``: N users at once instead (each its own page: client id, image, slider moves
one after another), against ``featinv serve`` with and without cross-client batching, in one run:
throughput (requests/s) and median / p90 latency per mode, and the ratio batched / unbatched.

    python benchmarks/bench_webapp.py --clients 20 --moves 3 --device cpu

With ``--previews``: the same slider moves with live previews (``/api/reconstruct/stream``, timed
to the final pictures) and without (``/api/reconstruct``), interleaved on one server after a
warm-up: median and worst per way, the previews each move received, and the ratio on / off (the
explorer's budget: previews cost at most 10% more).

    python benchmarks/bench_webapp.py --previews --moves 21 --device cpu
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
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


def measure(backend: str, device: str, strengths: list[float], extra: list[str], label: str | None = None) -> dict:
    """Start ``featinv serve`` on ``backend``, time its start-up and a slider sweep on each model."""
    with _serving(backend, device, extra) as (url, info, startup_s):
        row = {"backend": label or backend, "device": device, "startup_s": startup_s, "sampling": info.get("sampling")}
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


def _stream(url: str, body: dict) -> tuple[dict, int]:
    """``/api/reconstruct/stream``'s final answer and how many previews came before it."""
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    previews, event = 0, None
    with urllib.request.urlopen(request, timeout=600) as response:
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("event: "):
                event = line[len("event: ") :]
                previews += event == "preview"
            elif line.startswith("data: ") and event in ("final", "error"):
                answer = json.loads(line[len("data: ") :])
                if event == "error":
                    raise RuntimeError(f"the stream ended with an error: {answer}")
                return answer, previews
    raise RuntimeError("the stream ended without a final answer")


def measure_previews(device: str, strengths: list[float], extra: list[str]) -> dict:
    """The slider sweep with previews on and off, interleaved (order alternating) on one server."""
    with _serving("eager", device, extra) as (url, info, startup_s):
        image = _post(url + "example/0")["id"]
        for strength in strengths[:2]:  # warm-up: the preview cadence adapts to the measured step time
            _stream(url + "reconstruct/stream", {"id": image, "strength": strength})
            _post(url + "reconstruct", {"id": image, "strength": strength})
        seconds: dict[str, list[float]] = {"on": [], "off": []}
        previews = []
        for k, strength in enumerate(strengths):
            for way in ("on", "off") if k % 2 == 0 else ("off", "on"):
                begin = time.perf_counter()
                if way == "on":
                    result, count = _stream(url + "reconstruct/stream", {"id": image, "strength": strength})
                    previews.append(count)
                else:
                    result = _post(url + "reconstruct", {"id": image, "strength": strength})
                seconds[way].append(time.perf_counter() - begin)
                assert len(result["images"]) == info["seeds"], result
    row = {"device": device, "startup_s": startup_s, "sampling": info.get("sampling"), "steps": info["steps"]}
    for way, values in seconds.items():
        row[f"previews_{way}"] = {"median_s": statistics.median(values), "worst_s": max(values), "moves": len(values)}
    row["previews_per_move"] = statistics.median(previews)
    row["ratio_on_off"] = row["previews_on"]["median_s"] / row["previews_off"]["median_s"]
    return row


def measure_clients(clients: int, device: str, strengths: list[float], extra: list[str], batching: bool) -> dict:
    """``clients`` users at once, each moving its slider through ``strengths`` on its own image."""
    flags = [] if batching else ["--no-batching"]
    with _serving("eager", device, [*extra, *flags]) as (url, info, startup_s):
        images = [_post(url + f"example/{k % info['examples']}")["id"] for k in range(clients)]
        latencies: list[float] = []
        lock = threading.Lock()

        def user(k: int) -> None:
            for strength in strengths:
                begin = time.perf_counter()
                result = _post(url + "reconstruct", {"id": images[k], "strength": strength, "client": f"user{k}"})
                assert len(result["images"]) == info["seeds"], result
                with lock:
                    latencies.append(time.perf_counter() - begin)

        threads = [threading.Thread(target=user, args=(k,)) for k in range(clients)]
        begin = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - begin
    ordered = sorted(latencies)
    return {
        "batching": batching,
        "device": device,
        "clients": clients,
        "requests": len(latencies),
        "requests_per_s": len(latencies) / wall,
        "median_s": statistics.median(ordered),
        "p90_s": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "startup_s": startup_s,
    }


class _serving:
    """``featinv serve`` in a process of its own: (API url, /api/info, start-up seconds) while open."""

    def __init__(self, backend: str, device: str, extra: list[str]) -> None:
        self.backend, self.device, self.extra = backend, device, extra

    def __enter__(self) -> tuple[str, dict, float]:
        port = _free_port()
        url = f"http://127.0.0.1:{port}/api/"
        command = [sys.executable, "-m", "featinv.cli", "serve", "--port", str(port), "--device", self.device]
        command += ["--backend", self.backend, *self.extra]
        self.log = tempfile.TemporaryFile("w+")
        started = time.perf_counter()
        self.server = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        while True:
            try:
                info = json.load(urllib.request.urlopen(url + "info", timeout=5))
                return url, info, time.perf_counter() - started
            except OSError:
                if self.server.poll() is not None:
                    self.log.seek(0)
                    text = self.log.read()[-2000:]
                    self.log.close()
                    raise RuntimeError(f"featinv serve --backend {self.backend} ended:\n{text}") from None
                time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        self.server.terminate()
        self.server.wait(30)
        self.log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["eager", "compiled"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--moves", type=int, default=11, help="slider positions per model (default 11)")
    parser.add_argument("--out", help="JSON file to write")
    parser.add_argument("--clients", type=int, help="N users at once, with and without cross-client batching")
    parser.add_argument("--realtime", action="store_true", help="the default server against the real-time mode")
    parser.add_argument("--previews", action="store_true", help="slider moves with live previews against without")
    parser.add_argument("serve_args", nargs="*", help="more arguments for featinv serve, after --")
    args = parser.parse_args()
    strengths = [round(-0.5 + 2.0 * i / max(args.moves - 1, 1), 3) for i in range(args.moves)]
    if args.clients:
        return main_clients(args, strengths)
    if args.previews:
        return main_previews(args, strengths)
    rows = []
    runs = [(backend, backend, []) for backend in args.backends]
    if args.realtime:
        runs = [("eager", "default", []), ("eager", "realtime", ["--realtime"])]
    for backend, label, flags in runs:
        try:
            rows.append(measure(backend, args.device, strengths, [*args.serve_args, *flags], label))
        except (RuntimeError, urllib.error.URLError) as error:  # recorded, the run goes on
            rows.append({"backend": label, "device": args.device, "error": str(error)})
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


def main_clients(args: argparse.Namespace, strengths: list[float]) -> None:
    """The concurrent-clients mode: batched and unbatched serving side by side, one run."""
    rows = [measure_clients(args.clients, args.device, strengths, args.serve_args, b) for b in (False, True)]
    for row in rows:
        print(json.dumps(row), flush=True)
    unbatched, batched = rows
    ratio = batched["requests_per_s"] / unbatched["requests_per_s"]
    print(f"\n{args.clients} clients x {len(strengths)} moves on {args.device}")
    print(f"{'mode':<10} {'requests/s':>11} {'median':>8} {'p90':>8}")
    for row in rows:
        name = "batched" if row["batching"] else "unbatched"
        print(f"{name:<10} {row['requests_per_s']:>11.2f} {row['median_s']:>7.2f}s {row['p90_s']:>7.2f}s")
    print(f"throughput batched / unbatched: {ratio:.2f}x")
    if args.out:
        result = {"clients": args.clients, "strengths": strengths, "rows": rows, "throughput_ratio": ratio}
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def main_previews(args: argparse.Namespace, strengths: list[float]) -> None:
    """The previews mode: the same moves with and without live previews, one server, one run."""
    row = measure_previews(args.device, strengths, args.serve_args)
    print(json.dumps(row), flush=True)
    print(f"\nslider moves on {args.device} ({row['sampling']}), previews on vs off, {len(strengths)} moves each")
    print(f"{'previews':<9} {'median':>8} {'worst':>8}")
    for way in ("on", "off"):
        cell = row[f"previews_{way}"]
        print(f"{way:<9} {cell['median_s']:>7.3f}s {cell['worst_s']:>7.3f}s")
    print(
        f"previews per move: {row['previews_per_move']:g} of {row['steps']} steps; on / off: {row['ratio_on_off']:.3f}x"
    )
    if args.out:
        Path(args.out).write_text(json.dumps({"strengths": strengths, "rows": [row]}, indent=2) + "\n")


if __name__ == "__main__":
    main()

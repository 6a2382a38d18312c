"""The web app in a real browser: headless Chromium (Debian's chromium + chromium-driver) drives the
page that ``featinv serve`` (its own process, as a user runs it) serves on 127.0.0.1: the first
impression (an example reconstructed by itself, previews before the final pictures, no broken
image), cancellation on the server, painted cells (ablate, paste B), upload an image, move the
steering slider and see the pictures change, switch to the pooled model and back, and get a message,
not a crash, for bad uploads. Screenshots are kept in test-artifacts/."""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
# A browser and a server start per module (16.8 s on CI for the first test): every test here is heavy.
pytestmark = [
    pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver"),
    pytest.mark.heavy,
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [sys.executable, "-m", "featinv.cli", "serve", "--port", str(port), "--device", "cpu"]
    with log.open("w") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + "api/info", timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"featinv serve did not start:\n{log.read_text()}") from None
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _updates(browser) -> int:
    return int(browser.find_element("tag name", "body").get_attribute("data-updates") or 0)


def _results(browser) -> list[str]:
    return [img.get_attribute("src") or "" for img in browser.find_elements("css selector", "img.result")]


def test_upload_reconstruct_steer_and_bad_uploads(app_url, browser, tmp_path):
    from featinv.data.shapes import generate_shapes
    from featinv.images import save_image

    picture = tmp_path / "shape.png"
    save_image(generate_shapes(1, 4242).images[0], picture)
    browser.get(app_url)
    _wait(lambda: browser.find_elements("css selector", "img.result"), 30, "the page to load")

    _wait(lambda: _updates(browser) >= 1, 60, "the example's reconstructions")
    updates = _updates(browser)
    browser.find_element("id", "upload").send_keys(str(picture))
    _wait(lambda: _updates(browser) > updates, 60, "the upload's reconstructions")
    first = _results(browser)
    assert len(first) == 3 and len(set(first)) == 3  # three seeds, three different pictures
    spread = _wait(lambda: browser.find_element("id", "spread").get_attribute("src"), 10, "the seeds' spread map")
    assert spread.startswith("data:image/png")

    updates = _updates(browser)
    slider = browser.find_element("id", "strength")
    browser.execute_script(
        "arguments[0].value = '1'; arguments[0].dispatchEvent(new Event('input', {bubbles: true}));", slider
    )
    _wait(
        lambda: _updates(browser) > updates,
        10,
        "a reconstruction after the slider moved",
    )
    # the move shows new pictures (how fast: benchmarks/bench_webapp.py, not a timed test)
    changed = _results(browser)
    assert changed != first
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "webapp.png"))

    # The shipped pooled model, on the same image and sliders: other pictures, then back.
    for mode in ("pooled", "spatial"):
        updates = _updates(browser)
        browser.find_element("id", f"mode-{mode}").click()
        _wait(lambda before=updates: _updates(browser) > before, 10, f"the {mode} model's reconstructions")
        assert browser.find_element("id", "mode-name").text == mode
        if mode == "pooled":
            assert _results(browser) != changed
            browser.save_screenshot(str(ARTIFACTS / "webapp-pooled.png"))
    assert _results(browser) == changed  # the same request as before the switch, the same pictures

    bad_files = {
        "notes.png": b"this is not an image",
        "model.safetensors": (16).to_bytes(8, "little") + b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    }
    for name, data in bad_files.items():
        path = tmp_path / name
        path.write_bytes(data)
        browser.find_element("id", "upload").send_keys(str(path))
        message = _wait(lambda: browser.find_element("id", "message").text, 10, f"a message for {name}")
        assert "image" in message
    huge = tmp_path / "huge.png"
    from PIL import Image

    Image.new("RGB", (5000, 4000)).save(huge)
    browser.find_element("id", "upload").send_keys(str(huge))
    _wait(lambda: "pixels" in browser.find_element("id", "message").text, 20, "a message for the huge image")

    # The server keeps serving: the mix slider with an example image still updates the pictures.
    browser.find_element("id", "example-b").click()
    updates = _updates(browser)
    browser.execute_script(
        "arguments[0].value = '0.5'; arguments[0].dispatchEvent(new Event('input', {bubbles: true}));",
        browser.find_element("id", "mix"),
    )
    _wait(
        lambda: _updates(browser) > updates,
        10,
        "an update after the bad uploads",
    )
    assert browser.find_element("id", "message").text == ""


def _pixels(data_url: str):
    """A data URL's PNG as a float tensor (3, H, W) in [0, 1]."""
    from PIL import Image

    from featinv.images import from_pil

    return from_pil(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))


def _stats(url: str) -> dict:
    with urllib.request.urlopen(url + "api/stats", timeout=30) as response:
        return json.load(response)


def _paint(browser, cells):
    """Drag the pointer over the map's grid cells [(row, column), ...], as a user paints."""
    browser.execute_script(
        """
        const [canvas, cells, grid] = arguments;
        const box = canvas.getBoundingClientRect();
        const at = ([r, c]) => ({ clientX: box.left + (c + 0.5) * box.width / grid[1],
                                  clientY: box.top + (r + 0.5) * box.height / grid[0], bubbles: true });
        canvas.dispatchEvent(new PointerEvent("pointerdown", at(cells[0])));
        for (const cell of cells.slice(1)) canvas.dispatchEvent(new PointerEvent("pointermove", at(cell)));
        window.dispatchEvent(new PointerEvent("pointerup", { bubbles: true }));
        """,
        browser.find_element("id", "cells"),
        [list(cell) for cell in cells],
        _grid(browser),
    )


def _grid(browser) -> list[int]:
    return browser.execute_script("return state.grid")


def _move(browser, slider: str, value: str) -> None:
    browser.execute_script(
        "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input', {bubbles: true}));",
        browser.find_element("id", slider),
        value,
    )


def test_the_explorer_first_impression_cancelling_and_painted_cells(app_url, browser):
    browser.get(app_url)
    # First impression: an example loads and is reconstructed by itself; previews came first; every
    # image on the page has loaded (placeholders until the real pictures: never a broken image).
    _wait(lambda: _updates(browser) >= 1, 60, "the example that loads by itself")
    body = browser.find_element("tag name", "body")
    assert int(body.get_attribute("data-previews-before-final")) >= 1
    widths = browser.execute_script("return [...document.images].map((img) => [img.id, img.naturalWidth])")
    assert len(widths) >= 8 and all(width > 0 for _, width in widths), widths
    assert browser.find_element("id", "label-a").text and browser.find_element("id", "map").get_attribute("src")
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "explorer.png"))

    # A slider moved during a reconstruction cancels it on the server (its counter says so).
    cancelled = _stats(app_url)["cancelled"]
    updates = _updates(browser)
    _move(browser, "strength", "0.5")
    _wait(lambda: int(body.get_attribute("data-previews-now") or 0) >= 1, 30, "the first request to be under way")
    _move(browser, "strength", "0")
    _wait(lambda: _updates(browser) > updates, 60, "the second request's pictures")
    assert _stats(app_url)["cancelled"] > cancelled
    unedited = _results(browser)

    # Ablate a painted block: the reconstruction changes more inside it than outside.
    rows, columns = _grid(browser)
    block = [
        (r, c)
        for r in range(rows // 4, rows // 4 + rows // 2)
        for c in range(columns // 4, columns // 4 + columns // 2)
    ]
    Select = pytest.importorskip("selenium.webdriver.support.select").Select
    Select(browser.find_element("id", "operation")).select_by_value("zero")
    updates = _updates(browser)
    _paint(browser, block)
    _wait(lambda: _updates(browser) > updates, 60, "the ablated reconstruction")
    assert json.loads(body.get_attribute("data-unedited")) == unedited  # the unedited twin: the pictures before
    edited = _results(browser)
    inside = outside = 0.0
    for before, after in zip(unedited, edited, strict=True):
        change = (_pixels(after) - _pixels(before)).abs().mean(0)  # (H, W)
        mask = change.new_zeros(rows, columns)
        for r, c in block:
            mask[r, c] = 1
        mask = torch_nearest(mask, change.shape)
        inside += float((change * mask).sum() / mask.sum())
        outside += float((change * (1 - mask)).sum() / (1 - mask).sum())
    assert inside > outside, (inside, outside)
    assert browser.find_element("id", "difference").get_attribute("src") != browser.execute_script("return PLACEHOLDER")
    browser.save_screenshot(str(ARTIFACTS / "explorer-ablate.png"))

    # Paste B's map into every cell: B's own reconstruction, the same seeds, to 1e-5.
    browser.find_element("id", "clear").click()
    Select(browser.find_element("id", "operation")).select_by_value("paste")
    updates = _updates(browser)
    _paint(browser, [(r, c) for r in range(rows) for c in range(columns)])
    _wait(lambda: _updates(browser) > updates, 60, "the pasted reconstruction")
    pasted = _results(browser)
    other = browser.execute_script("return state.other")
    request = urllib.request.Request(
        app_url + "api/reconstruct",
        data=json.dumps({"id": other, "client": "the-test"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        of_b = json.load(response)["images"]
    for ours, theirs in zip(pasted, of_b, strict=True):
        assert float((_pixels(ours) - _pixels(theirs)).abs().max()) <= 1e-5


def torch_nearest(mask, size):
    """A (rows, columns) cell mask at (H, W) pixels, each cell a block (nearest neighbour)."""
    import torch.nn.functional as F

    return F.interpolate(mask[None, None], size=tuple(size), mode="nearest")[0, 0]


def test_the_notebook_widgets_front_end_draws_and_sends_painted_cells(browser, tmp_path):
    """featinv/web/widget.js (the notebook widget's face) in Chromium, with a stand-in for
    anywidget's model: it draws the kernel's pictures and sends painted cells back."""
    import functools
    import http.server
    import threading

    web = Path(__file__).resolve().parents[1] / "featinv" / "web"
    for name in ("widget.js", "widget.css"):
        shutil.copy(web / name, tmp_path / name)
    (tmp_path / "index.html").write_text(
        """<!doctype html><html><head><link rel="stylesheet" href="widget.css"></head><body><div id="root"></div>
<script type="module">
import widget from "./widget.js";
const state = { strength: 0, mix: 0, concept: 0, cells: [], operation: "steer", previews: true, image_a: "",
  image_b: "", map_picture: "", norm_picture: "", images: ["", "", ""], difference: "", status: "ready",
  grid: [8, 8], class_names: ["circle", "star"], steer_note: "", operations: ["steer", "zero", "mean", "paste"] };
const handlers = {}; window.sent = [];
const model = { get: (k) => state[k], set: (k, v) => { state[k] = v; },
  save_changes: () => { window.sent.push(JSON.parse(JSON.stringify(state))); },
  on: (name, f) => { (handlers[name] = handlers[name] || []).push(f); } };
widget.render({ model, el: document.getElementById("root") });
window.rendered = true;
</script></body></html>"""
    )
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/index.html")
        _wait(lambda: browser.execute_script("return window.rendered === true"), 10, "the widget to render")
        assert browser.execute_script("return document.querySelectorAll('.fx-results img').length") == 3
        browser.execute_script(
            """
            const canvas = document.querySelector('.fx-cells'), box = canvas.getBoundingClientRect();
            const at = (r, c) => ({ clientX: box.left + (c + 0.5) * box.width / 8,
                                    clientY: box.top + (r + 0.5) * box.height / 8, bubbles: true });
            canvas.dispatchEvent(new PointerEvent('pointerdown', at(2, 3)));
            canvas.dispatchEvent(new PointerEvent('pointermove', at(2, 4)));
            window.dispatchEvent(new PointerEvent('pointerup', { bubbles: true }));
            const operation = document.querySelector('.fx-operation');
            operation.value = 'paste'; operation.dispatchEvent(new Event('change'));
            """
        )
        sent = browser.execute_script("return window.sent")
        assert sent[0]["cells"] == [[2, 3], [2, 4]] and sent[-1]["operation"] == "paste"
    finally:
        server.shutdown()

"""The web app in a real browser: headless Chromium (Debian's chromium + chromium-driver) drives the
page that ``featinv serve`` (its own process, as a user runs it) serves on 127.0.0.1: upload an
image, wait for its reconstructions, move the steering slider and see them change within 2 seconds
on the CPU, switch to the pooled model and back, and get a message, not a crash, for bad uploads.
Screenshots are kept in test-artifacts/."""

from __future__ import annotations

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
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver")
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

    browser.find_element("id", "upload").send_keys(str(picture))
    first = _wait(
        lambda: all(s.startswith("data:image/png") for s in _results(browser)) and _results(browser),
        60,
        "the first reconstructions",
    )
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

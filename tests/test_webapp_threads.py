"""The web app's handlers leave every tensor operation to the server's one thread (see
``RealtimeReconstructor``): a profiler on every thread the app starts records the torch calls
each one makes while a client uploads, picks an example and moves the sliders."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import urllib.request
import uuid

import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")


def _is_torch_call(function) -> bool:
    return isinstance(getattr(function, "__self__", None), torch.Tensor) or (
        getattr(function, "__module__", None) or ""
    ).startswith("torch")


def _post(url: str, body: bytes, content_type: str) -> dict:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def _upload(url: str, png: bytes) -> dict:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + png
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return _post(url, body, f"multipart/form-data; boundary={boundary}")


def test_the_handlers_threads_run_no_tensor_operation():
    from PIL import Image

    from featinv.training.demo_preset import PRETRAINED, SPATIAL_DIR
    from featinv.web.app import create_app

    calls: list[tuple[str, str]] = []

    def spy(frame, event, function):
        if event == "c_call" and _is_torch_call(function):
            calls.append((threading.current_thread().name, getattr(function, "__qualname__", repr(function))))

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    threading.setprofile(spy)  # every thread started from here on: the server's, uvicorn's, the handlers'
    app = server = thread = None
    try:
        app = create_app(PRETRAINED / SPATIAL_DIR, device="cpu", steps=2)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/api/"
        png = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 40, 40)).save(png, format="PNG")
        a = _upload(url + "upload", png.getvalue())["id"]
        b = _post(url + "example/4", b"", "application/json")["id"]
        query = {"id": a, "other": b, "mix": 0.5, "strength": 1.0, "concept": 1}
        result = _post(url + "reconstruct", json.dumps(query).encode(), "application/json")
        assert len(result["images"]) == 3 and 0.0 <= result["concept_probability"] <= 1.0
    finally:
        threading.setprofile(None)
        if thread is not None:
            server.should_exit = True
            thread.join(10)
        if app is not None:
            app.state.server.close()
    threads = {name for name, _ in calls}
    assert any(name.startswith("featinv-serve") for name in threads)  # the profiler sees the server's work
    elsewhere = sorted({(name, call) for name, call in calls if not name.startswith("featinv-serve")})
    assert not elsewhere, f"tensor work outside the server's thread: {elsewhere[:10]}"

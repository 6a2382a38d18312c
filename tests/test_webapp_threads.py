"""The web app's handlers leave every tensor operation to the servers' one thread (see
``ReconstructionServer``): a profiler on every thread the app starts records the torch calls
each one makes while a client uploads, picks an example, moves the sliders, switches to the
pooled model and asks for a refined reconstruction. And the switch's models must be one
classifier's spatial and pooled maps."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from helpers import post, upload  # noqa: E402


def _is_torch_call(function) -> bool:
    return isinstance(getattr(function, "__self__", None), torch.Tensor) or (
        getattr(function, "__module__", None) or ""
    ).startswith("torch")


@pytest.mark.heavy
def test_the_handlers_threads_run_no_tensor_operation():
    from PIL import Image

    from featinv.training.demo_preset import POOLED_DIR, PRETRAINED, SPATIAL_DIR
    from featinv.web.app import create_app

    calls: list[tuple[str, str]] = []
    serving_threads: set[int] = set()

    def spy(frame, event, function):
        if event == "c_call" and _is_torch_call(function):
            thread = threading.current_thread()
            calls.append((thread.name, getattr(function, "__qualname__", repr(function))))
            if thread.name.startswith("featinv-serve"):
                serving_threads.add(thread.ident)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    threading.setprofile(spy)  # every thread started from here on: the server's, uvicorn's, the handlers'
    app = server = thread = None
    try:
        app = create_app(PRETRAINED / SPATIAL_DIR, pooled_model=PRETRAINED / POOLED_DIR, device="cpu", steps=2)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/api/"
        png = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 40, 40)).save(png, format="PNG")
        a = upload(url + "upload", png.getvalue())["id"]
        b = post(url + "example/4", b"", "application/json")["id"]
        query = {"id": a, "other": b, "mix": 0.5, "strength": 1.0, "concept": 1}
        result = post(url + "reconstruct", json.dumps(query).encode(), "application/json")
        assert len(result["images"]) == 3 and 0.0 <= result["concept_probability"] <= 1.0
        assert result["spread"].startswith("data:image/png;base64,")  # the seeds' per-pixel spread
        pooled = post(url + "reconstruct", json.dumps({**query, "mode": "pooled"}).encode(), "application/json")
        assert len(pooled["images"]) == 3 and pooled["images"] != result["images"]
        refined = post(url + "reconstruct", json.dumps({**query, "refine": True}).encode(), "application/json")
        assert refined["refined"] and not result["refined"] and refined["seconds"] > 0  # the page shows the cost
        assert len(refined["images"]) == 3 and refined["images"] != result["images"]
        with pytest.raises(urllib.error.HTTPError) as bad:
            post(url + "reconstruct", json.dumps({**query, "mode": "tiled"}).encode(), "application/json")
        assert "mode must be one of ['spatial', 'pooled'], got 'tiled'" in json.load(bad.value)["error"]
        # The explorer's routes too: painted cells, the streamed previews, the edited map's file.
        painted = {**query, "cells": [[0, 0], [3, 4]], "operation": "mean"}
        edited = post(url + "reconstruct", json.dumps(painted).encode(), "application/json")
        assert edited["difference"].startswith("data:image/png") and edited["unedited"] == result["images"]
        assert edited["map"].startswith("data:image/png") and edited["norm"].startswith("data:image/png")
        stream = urllib.request.Request(
            url + "reconstruct/stream", data=json.dumps(painted).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(stream, timeout=60) as response:
            events = [line.decode().strip() for line in response if line.startswith(b"event: ")]
        assert events[-1] == "event: final" and "event: preview" in events
        request = urllib.request.Request(
            url + "map", data=json.dumps(painted).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            from safetensors.torch import load

            assert load(response.read())["features"].shape == (1, 192, 8, 8)
        for bad_query, message in (
            ({**painted, "operation": "blur"}, "operation must be one of steer, zero, mean, paste, got 'blur'"),
            ({**painted, "cells": [[9, 0]]}, "cell (9, 0) is off the 8x8 grid of the feature map"),
        ):
            with pytest.raises(urllib.error.HTTPError) as bad:
                post(url + "reconstruct", json.dumps(bad_query).encode(), "application/json")
            assert message in json.load(bad.value)["error"]
    finally:
        threading.setprofile(None)
        if thread is not None:
            server.should_exit = True
            thread.join(10)
        if app is not None:
            for server_of_mode in app.state.servers.values():
                server_of_mode.close()
    assert len(serving_threads) == 1, serving_threads  # the profiler sees the servers' work, on one shared thread
    elsewhere = sorted({(name, call) for name, call in calls if not name.startswith("featinv-serve")})
    assert not elsewhere, f"tensor work outside the server's thread: {elsewhere[:10]}"


@pytest.mark.heavy  # above 2 s in a full run: too near the 3 s limit
def test_the_switch_takes_one_classifiers_spatial_and_pooled_models(tmp_path):
    from conftest import make_extractor, make_model

    from featinv.errors import FeatInvError
    from featinv.training.demo_preset import PRETRAINED, SPATIAL_DIR
    from featinv.web.app import create_app

    with pytest.raises(FeatInvError, match="pooled_model must be trained on pooled maps and model on spatial ones"):
        create_app(PRETRAINED / SPATIAL_DIR, pooled_model=PRETRAINED / SPATIAL_DIR, device="cpu", steps=1)
    other_layer = make_model(make_extractor("resnet", "layer2", mode="pooled"))
    with pytest.raises(FeatInvError, match=r"pooled_model was trained for resnet\w* layer 'layer2'"):
        create_app(make_model(), pooled_model=other_layer, device="cpu", steps=1)


def test_serve_names_a_missing_folder(capsys, tmp_path):
    from featinv.cli import main

    for flag in ("--model", "--pooled-model"):
        assert main(["serve", flag, str(tmp_path / "none"), "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"featinv: error: {flag} folder not found: {tmp_path / 'none'}"], err


def test_serve_checks_its_address_before_loading_anything(capsys):
    from featinv.cli import main

    assert main(["serve", "--port", "70000"]) == 2
    assert "featinv: error: argument --port: must be an integer in [1, 65535]" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        assert main(["serve", "--port", str(port), "--device", "cpu"]) == 2
        assert time.monotonic() - started < 2  # no model was loaded
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot listen on --host 127.0.0.1 --port {port}: Address already in use" in err[0], err


@pytest.mark.parametrize("folder", ["shapes-resnet", "shapes-vit", "shapes-demo"])
def test_the_shipped_shapes_models_name_their_classes_from_their_record(folder):
    """The page's class names come from the model's classifier.json, not from the classifier's
    name: the ResNet and ViT shapes models used to get 'class 0' ... 'class 5'."""
    from featinv.data.shapes import CLASSES
    from featinv.paths import PRETRAINED
    from featinv.web.app import create_app

    app = create_app(PRETRAINED / folder, device="cpu", steps=1)
    try:
        info = next(route.endpoint for route in app.routes if getattr(route, "path", "") == "/api/info")()
        assert info["class_names"] == list(CLASSES) and info["examples"] == 100 and info["refine"]
    finally:
        for server in app.state.servers.values():
            server.close()


def test_a_model_without_a_record_gets_numbered_classes(tmp_path):
    from conftest import make_model

    from featinv.web.app import create_app

    model = make_model()
    model.save_pretrained(tmp_path / "m")
    assert model.class_names is None and not (tmp_path / "m" / "classifier.json").exists()
    app = create_app(tmp_path / "m", device="cpu", steps=1)
    try:
        info = next(route.endpoint for route in app.routes if getattr(route, "path", "") == "/api/info")()
        assert info["class_names"] == [f"class {k}" for k in range(10)] and info["examples"] == 0
        assert info["refine"]  # make_model stores its classifier
    finally:
        for server in app.state.servers.values():
            server.close()

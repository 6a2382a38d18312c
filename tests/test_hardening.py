"""Hostile input: model folders with bad fields, absurd numbers, non-finite results, damaged
checkpoints, file modes for others, and a web server that stays responsive and bounded. Each bad
input is one line and exit code 2 (or a FeatInvError in the API), with nothing written."""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import make_model
from helpers import assert_one_line_error, run_cli
from safetensors.torch import save_file

from featinv.errors import FeatInvError
from featinv.models import FeatInvModel
from featinv.pipeline import Reconstructor


def _edit_config(folder: Path, edit) -> None:
    path = folder / "featinv.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


HOSTILE_FIELDS = {
    "scalar input_size": (lambda c: c["feature_spec"].update(input_size=32), "input_size must be [3, H, W]"),
    "huge input_size": (lambda c: c["feature_spec"].update(input_size=[3, 40000, 40000]), "H and W in [1, 4096]"),
    "extra key": (lambda c: c["feature_spec"].update(colour="red"), "unknown fields colour"),
    "missing key": (lambda c: c["feature_spec"].pop("channels"), "feature_spec lacks channels"),
    "string channels": (lambda c: c["feature_spec"].update(channels="256"), "channels must be an integer"),
    "bad mode": (lambda c: c["feature_spec"].update(mode="tiled"), "mode must be one of spatial, pooled"),
    "list schedule": (lambda c: c.update(noise_schedule=[1, 2]), "noise_schedule must be an object"),
    "string timesteps": (
        lambda c: c["noise_schedule"].update(num_train_timesteps="1000"),
        "num_train_timesteps must be an integer",
    ),
    "unknown beta schedule": (
        lambda c: c["noise_schedule"].update(beta_schedule="cosine"),
        "beta_schedule must be one of linear",
    ),
    "string has_vae": (lambda c: c.update(has_vae="no"), "has_vae must be true or false"),
    "not an object": (lambda c: c.clear(), "lacks format_version"),
}


@pytest.mark.parametrize("case", list(HOSTILE_FIELDS))
def test_a_hostile_model_field_is_one_line(capsys, model_dir, image_files, tmp_path, case):
    edit, message = HOSTILE_FIELDS[case]
    _edit_config(model_dir, edit)
    for command in (["info"], ["reconstruct", "--images", image_files[0], "--out", tmp_path / "out"]):
        code, _, err = run_cli(capsys, *command, "--model", model_dir)
        assert_one_line_error(code, err, message)
        assert "featinv.json" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("contexts", "message"),
    [
        ({"context": torch.zeros(1, 4, 7), "null_context": torch.zeros(1, 4, 7)}, "expected (1, L, 16)"),
        ({"context": torch.full((1, 4, 16), math.nan), "null_context": torch.zeros(1, 4, 16)}, "NaN or Inf"),
        ({"context": torch.zeros(1, 4, 16), "null_context": torch.zeros(1, 5, 16)}, "differ"),
    ],
)
def test_corrupt_contexts_are_refused_on_load(model_dir, contexts, message):
    save_file(contexts, str(model_dir / "contexts.safetensors"))
    with pytest.raises(FeatInvError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FeatInvModel.from_pretrained(model_dir)


NUMBERS = [
    (["reconstruct", "--seed", 2**63], "argument --seed: must be an integer in [0, 2^63 - 1]"),
    (["reconstruct", "--seed", 2**63 - 1], "image i uses seed + i"),  # two images: seed + 1 overflows
    (["reconstruct", "--seed", -1], "argument --seed: must be an integer in [0, 2^63 - 1]"),
    (["reconstruct", "--steps", 1000], "argument --steps: must be an integer in [1, 999]"),
    (["reconstruct", "--steps", 0], "argument --steps: must be an integer in [1, 999]"),
    (["export", "--opset", 3], "opset must be an integer in [14,"),
    (["export", "--opset", 99], "argument --opset: must be an integer in [1, 64]"),
    (["features", "cache", "--batch-size", 0], "argument --batch-size: must be an integer in [1, 8192]"),
    (["train", "--time-budget", -1], "argument --time-budget: must be a number in [0, 31_536_000]"),
    (["train", "--seed", 2**64], "argument --seed: must be an integer in [0, 2^63 - 1]"),
]


@pytest.mark.parametrize(("command", "message"), NUMBERS, ids=[" ".join(map(str, c)) for c, _ in NUMBERS])
def test_absurd_numbers_are_one_line(capsys, model_dir, image_files, tmp_path, command, message):
    out = tmp_path / "out"
    extra = {"reconstruct": ["--images", *image_files, "--quiet"], "features": ["--pool", 8], "train": ["--steps", 1]}
    code, _, err = run_cli(capsys, *command, "--model", model_dir, "--out", out, *extra.get(command[0], []))
    assert_one_line_error(code, err, message)
    assert not out.exists()


def test_absurd_sizes_and_create_numbers_are_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "data", "shapes", "--out", tmp_path / "d", "--size", 100000)
    assert_one_line_error(code, err, "argument --size: must be an integer in [8, 1024]")
    code, _, err = run_cli(capsys, "data", "shapes", "--out", tmp_path / "d", "--n", 100_000, "--size", 1024)
    assert_one_line_error(code, err, "GiB in memory")
    for flag in ("--input-size", "--image-size", "--hint-channels"):
        code, _, err = run_cli(
            capsys, "create", "--preset", "micro", "--classifier", "resnet18", flag, 0, "--out", tmp_path / "m"
        )
        assert_one_line_error(code, err, f"argument {flag}: must be an integer in [")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_api_numbers_and_types(tiny_model, model_dir):
    reconstructor = Reconstructor(tiny_model)
    features = torch.zeros(1, *tiny_model.feature_spec.shape)
    with pytest.raises(FeatInvError, match="steps must be an integer"):
        reconstructor.reconstruct(features=features, steps=True)
    with pytest.raises(FeatInvError, match="seed must be an integer"):
        reconstructor.reconstruct(features=features, seed=2**63)
    with pytest.raises(FeatInvError, match="dtype must be torch.float32"):
        FeatInvModel.from_pretrained(model_dir, dtype="float16")


def test_a_non_finite_result_raises_and_says_why(capsys, tiny_model, model_dir, tmp_path):
    reconstructor = Reconstructor(tiny_model)
    extreme = torch.full((1, *tiny_model.feature_spec.shape), 1e30)
    with pytest.raises(FeatInvError, match="NaN or Inf values, so no image is returned.*extreme"):
        reconstructor.reconstruct(features=extreme, steps=2, progress=False)
    tiny_model.context.fill_(math.nan)  # a corrupt context that got past the file check
    with pytest.raises(FeatInvError, match="contexts or weights are corrupt"):
        reconstructor.reconstruct(features=torch.ones_like(extreme), steps=2, progress=False)
    save_file({"features": extreme}, str(tmp_path / "f.safetensors"))
    code, _, err = run_cli(
        capsys,
        "reconstruct",
        "--model",
        model_dir,
        "--features",
        tmp_path / "f.safetensors",
        "--out",
        tmp_path / "out",
        "--steps",
        2,
        "--quiet",
    )
    assert_one_line_error(code, err, "NaN or Inf")
    assert not (tmp_path / "out").exists()


# ----- checkpoints ---------------------------------------------------------------------------------
def _two_checkpoints(root: Path):
    from featinv.training import checkpoint as ckpt

    for step in (2, 4):
        ckpt.save_checkpoint(root, ckpt.Checkpoint(step, {"model": {"w": torch.full((3,), float(step))}}, {"s": step}))
    return ckpt


def _rewrite_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "damage",
    ["file and its hash", "step edited", "malformed step", "malformed sha256", "unreadable file with its hash"],
)
def test_a_damaged_checkpoint_falls_back_to_the_one_before(tmp_path, damage):
    from featinv.weights import file_sha256

    ckpt = _two_checkpoints(tmp_path)
    newest = tmp_path / "step-0000004"
    weights = newest / "model.safetensors"
    if damage == "file and its hash":
        save_file({"w": torch.full((3,), 99.0)}, str(weights))
        _rewrite_manifest(newest, lambda m: m["sha256"].update({"model.safetensors": file_sha256(weights)}))
    elif damage == "step edited":
        _rewrite_manifest(newest, lambda m: m.update(step=40))
    elif damage == "malformed step":
        _rewrite_manifest(newest, lambda m: m.update(step="four"))
    elif damage == "malformed sha256":
        _rewrite_manifest(newest, lambda m: m.update(sha256=["model.safetensors"]))
    else:
        weights.write_bytes(b"\x05" * 40)
        _rewrite_manifest(newest, lambda m: m["sha256"].update({"model.safetensors": file_sha256(weights)}))
    with pytest.warns(UserWarning, match="damaged checkpoint"):
        latest = ckpt.load_latest_checkpoint(tmp_path)
    assert latest.step == 2 and torch.equal(latest.tensors["model"]["w"], torch.full((3,), 2.0))


# ----- modes --------------------------------------------------------------------------------------
def test_created_files_are_readable_by_others_under_umask_022(capsys, tmp_path, image_files):
    old = os.umask(0o022)
    try:
        code, _, err = run_cli(
            capsys,
            "create",
            "--preset",
            "micro",
            "--classifier",
            "resnet18",
            "--layer",
            "layer3",
            "--input-size",
            32,
            "--out",
            tmp_path / "m",
        )
        assert code == 0, err
        code, _, err = run_cli(
            capsys,
            "reconstruct",
            "--model",
            tmp_path / "m",
            "--images",
            image_files[0],
            "--out",
            tmp_path / "out",
            "--steps",
            2,
            "--quiet",
        )
        assert code == 0, err
        _two_checkpoints(tmp_path / "ckpt")
    finally:
        os.umask(old)
    for root in ("m", "out", "ckpt"):
        for path in [tmp_path / root, *(tmp_path / root).rglob("*")]:
            mode = path.stat().st_mode & 0o777
            assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


# ----- the web server -----------------------------------------------------------------------------
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")


@pytest.fixture
def served(tmp_path):

    from featinv.web.app import create_app

    model = make_model()
    model.save_pretrained(tmp_path / "model")
    app = create_app(tmp_path / "model", device="cpu", steps=40, seeds=3, max_images=20)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield app, f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(10)
    app.state.server.close()


def _png(colour=(200, 40, 40)) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 28), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.heavy
def test_info_and_upload_answer_while_reconstructions_are_queued(served):
    from helpers import post, upload

    app, url = served
    image = upload(url + "api/upload", _png())["id"]
    start = time.perf_counter()
    single = post(url + "api/reconstruct", json.dumps({"id": image}).encode(), "application/json")
    one = time.perf_counter() - start
    assert len(single["images"]) == 3

    def reconstruct(client: int) -> None:
        query = {"id": image, "client": f"c{client}", "mix": 0.0}
        post(url + "api/reconstruct", json.dumps(query).encode(), "application/json")

    clients = [threading.Thread(target=reconstruct, args=(k,)) for k in range(4)]
    for client in clients:
        client.start()
    time.sleep(0.2)  # the four are queued on the one serving thread now
    started = time.perf_counter()
    urllib.request.urlopen(url + "api/info", timeout=10).read()
    info_s = time.perf_counter() - started
    started = time.perf_counter()
    upload(url + "api/upload", _png((10, 200, 10)))
    upload_s = time.perf_counter() - started
    busy = any(client.is_alive() for client in clients)
    for client in clients:
        client.join(120)
    assert busy, f"the reconstructions ({one:.2f} s each) ended before the probes: the test proves nothing"
    assert info_s < 1.0 and upload_s < 1.0, (info_s, upload_s, one)


@pytest.mark.heavy
def test_the_servers_memory_of_images_is_bounded_and_docs_are_off(served):
    from helpers import post, upload

    app, url = served
    ids = [upload(url + "api/upload", _png((k % 256, 0, 0)))["id"] for k in range(1000)]
    assert len(app.state.session.features) == 20
    with pytest.raises(urllib.error.HTTPError) as gone:
        post(url + "api/reconstruct", json.dumps({"id": ids[0]}).encode(), "application/json")
    assert gone.value.code == 404 and "keeps the 20 most recent" in json.load(gone.value)["error"]
    assert len(post(url + "api/reconstruct", json.dumps({"id": ids[-1]}).encode(), "application/json")["images"]) == 3
    assert app.state.session.in_flight == {}  # a finished request is not kept
    for route in ("docs", "openapi.json", "redoc"):
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(url + route, timeout=10)
        assert missing.value.code == 404

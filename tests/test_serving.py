"""The embeddable API: warmed up once, safe from several threads, previews every k steps, and
cancellation of a request in flight."""

from __future__ import annotations

import threading

import pytest
import torch

from featinv.models.featinv_model import FeatInvModel
from featinv.pipeline import Reconstructor
from featinv.serving import RealtimeReconstructor, RequestCancelled


@pytest.fixture
def server(tiny_model):
    server = RealtimeReconstructor(tiny_model, device="cpu", steps=6)
    yield server
    server.close()


def test_requests_from_several_threads_equal_sequential_runs(server, tiny_model, tiny_images):
    expected = [
        Reconstructor(tiny_model).reconstruct(tiny_images[i : i + 1], steps=6, sampler="dpmpp", seed=i, progress=False)
        for i in range(3)
    ]
    results: dict[int, torch.Tensor] = {}

    def client(i: int) -> None:
        results[i] = server.submit(tiny_images[i : i + 1], seed=i).result(timeout=60)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(3):
        torch.testing.assert_close(results[i], expected[i].images, rtol=0, atol=1e-6)


def test_previews_arrive_every_k_steps(server, tiny_images):
    seen = []
    images = server.submit(tiny_images, preview_every=2, on_preview=lambda i, p: seen.append((i, p.shape))).result(60)
    assert [i for i, _ in seen] == [1, 3, 5]
    assert all(shape == images.shape for _, shape in seen)


def test_a_request_can_be_cancelled_in_flight_and_the_server_goes_on(server, tiny_images):
    started = threading.Event()
    release = threading.Event()

    def hold(i, preview):  # pause the first request after its first step until it has been cancelled
        started.set()
        release.wait(10)

    first = server.submit(tiny_images, preview_every=1, on_preview=hold)
    second = server.submit(tiny_images, seed=5)
    assert started.wait(30)
    first.cancel()
    release.set()
    with pytest.raises(RequestCancelled):
        first.result(60)
    assert first.steps_run < server.steps
    assert second.result(60).shape == (3, 3, 16, 16)  # the server keeps serving


def test_bad_input_reaches_the_caller_not_the_server(server, tiny_images):
    with pytest.raises(ValueError, match="features"):
        server.submit(features=torch.zeros(1, 3, 2, 2)).result(30)
    assert server.submit(tiny_images[:1]).result(60).shape == (1, 3, 16, 16)


def test_warm_up_runs_at_the_batch_the_caller_will_send(tiny_model, monkeypatch):
    seen = []
    run = RealtimeReconstructor._run

    def spy(self, request, images, features, *rest):
        seen.append(tuple(features.shape))
        return run(self, request, images, features, *rest)

    monkeypatch.setattr(RealtimeReconstructor, "_run", spy)
    server = RealtimeReconstructor(tiny_model, device="cpu", steps=2, warmup_batch=3)
    server.close()
    assert seen == [(3, *tiny_model.feature_spec.shape)]
    with pytest.raises(ValueError, match="warmup_batch must be a positive integer"):
        RealtimeReconstructor(tiny_model, device="cpu", warmup_batch=0)


def test_backends_that_compile_per_shape_serve_padded_batches(tiny_model):
    compiled = RealtimeReconstructor(tiny_model, device="cpu", backend="compiled", warmup=False, warmup_batch=3)
    eager = RealtimeReconstructor(tiny_model, device="cpu", warmup=False)
    try:
        assert compiled.reconstructor.pad_batches and not eager.reconstructor.pad_batches
        assert compiled.reconstructor.exact_batches == {3}  # the batch it warms up at runs unpadded
    finally:
        compiled.close()
        eager.close()


def test_a_folder_is_loaded_and_all_tensor_work_runs_on_the_serving_thread(tiny_model, tmp_path, monkeypatch):
    tiny_model.save_pretrained(tmp_path / "model")
    threads = []
    load = FeatInvModel.from_pretrained

    def spy(path, **kwargs):
        threads.append(threading.current_thread().name)
        return load(path, **kwargs)

    monkeypatch.setattr(FeatInvModel, "from_pretrained", spy)
    server = RealtimeReconstructor(tmp_path / "model", device="cpu", steps=2)
    try:
        threads.append(server.call(lambda: threading.current_thread().name))
        assert len(threads) == 2 and all(name.startswith("featinv-serve") for name in threads)
        assert server.submit(features=torch.zeros(1, *tiny_model.feature_spec.shape)).result(60).shape == (1, 3, 16, 16)
        with pytest.raises(ZeroDivisionError):  # the caller gets the function's exception
            server.call(lambda: 1 / 0)
    finally:
        server.close()

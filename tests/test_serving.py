"""The embeddable API: warmed up once, safe from several threads, previews every k steps, and
cancellation of a request in flight."""

from __future__ import annotations

import threading

import pytest
import torch

from featinv.models.featinv_model import FeatInvModel
from featinv.pipeline import Reconstructor
from featinv.serving import ReconstructionServer, RequestCancelled


@pytest.fixture
def server(tiny_model):
    server = ReconstructionServer(tiny_model, device="cpu", steps=6)
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
    for i in range(3):  # requests queued together may share a batch: float rounding differs, by ~1e-6
        torch.testing.assert_close(results[i], expected[i].images, rtol=0, atol=1e-5)


def _one_then_queued(model, images, batching: bool) -> tuple[list[torch.Tensor], list[int]]:
    """One request runs (held after its first step) while two more queue and a third is cancelled:
    the queued requests' pictures and the batch sizes the reconstructor ran."""
    server = ReconstructionServer(model, device="cpu", steps=6, batching=batching, warmup=False)
    sizes = []
    original = server.reconstructor.reconstruct

    def counting(*args, **kwargs):
        sizes.append(len(kwargs["features"]))
        return original(*args, **kwargs)

    server.reconstructor.reconstruct = counting
    started, release = threading.Event(), threading.Event()

    def hold(i, preview):
        started.set()
        release.wait(10)

    try:
        first = server.submit(images[:1], seed=7, preview_every=1, on_preview=hold)
        assert started.wait(30)  # the first runs alone; the next ones queue behind it
        queued = [server.submit(images[i : i + 2], seed=10 * i) for i in range(2)]
        dropped = server.submit(images[:1], seed=1)
        dropped.cancel()
        release.set()
        first.result(60)
        pictures = [request.result(60) for request in queued]
        with pytest.raises(RequestCancelled):
            dropped.result(60)
    finally:
        server.close()
    return pictures, sizes


def test_queued_requests_of_several_clients_run_as_one_batch_with_their_own_pictures(tiny_model, tiny_images):
    """With batching the queued requests run as one denoiser batch (rows seeded as each would be
    alone), cancelled ones dropped; without, one at a time."""
    batched, batched_sizes = _one_then_queued(tiny_model, tiny_images, True)
    alone, alone_sizes = _one_then_queued(tiny_model, tiny_images, False)
    assert batched_sizes == [1, 4] and alone_sizes == [1, 2, 2]
    for together, single in zip(batched, alone, strict=True):
        assert together.shape == (2, 3, 16, 16)
        torch.testing.assert_close(together, single, rtol=0, atol=1e-5)  # the 8-bit pictures agree


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
    assert started.wait(30)
    second = server.submit(tiny_images, seed=5)  # queued behind the first, not in its batch
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
    run = ReconstructionServer._run

    def spy(self, jobs):
        seen.extend(tuple(job.maps.shape) for job in jobs)
        return run(self, jobs)

    monkeypatch.setattr(ReconstructionServer, "_run", spy)
    server = ReconstructionServer(tiny_model, device="cpu", steps=2, warmup_batch=3)
    server.close()
    assert seen == [(3, *tiny_model.feature_spec.shape)]
    with pytest.raises(ValueError, match="warmup_batch must be a positive integer"):
        ReconstructionServer(tiny_model, device="cpu", warmup_batch=0)


def test_backends_that_compile_per_shape_serve_padded_batches(tiny_model):
    compiled = ReconstructionServer(tiny_model, device="cpu", backend="compiled", warmup=False, warmup_batch=3)
    eager = ReconstructionServer(tiny_model, device="cpu", warmup=False)
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
    server = ReconstructionServer(tmp_path / "model", device="cpu", steps=2)
    try:
        threads.append(server.call(lambda: threading.current_thread().name))
        assert len(threads) == 2 and all(name.startswith("featinv-serve") for name in threads)
        assert server.submit(features=torch.zeros(1, *tiny_model.feature_spec.shape)).result(60).shape == (1, 3, 16, 16)
        with pytest.raises(ZeroDivisionError):  # the caller gets the function's exception
            server.call(lambda: 1 / 0)
    finally:
        server.close()

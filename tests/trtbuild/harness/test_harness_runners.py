"""Runners and the measurement loop on the real EfficientNet-Lite0 (ONNX Runtime CPU and PyTorch eager)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from trtbuild.core.errors import TrtbuildError
from trtbuild.harness.inputs import accuracy_feeds, make_feed
from trtbuild.harness.measure import measure, measure_interleaved
from trtbuild.harness.ort_runner import OrtRunner
from trtbuild.harness.runner import RunnerTensor
from trtbuild.harness.torch_runner import TorchRunner

IMAGES = [RunnerTensor("images", np.dtype(np.float32), ("batch", 3, 224, 224))]


def test_ort_measurement_is_sane(effnet_onnx: Path) -> None:
    with OrtRunner(effnet_onnx, threads=2) as runner:
        assert [i.name for i in runner.input_info()] == ["images"]
        feed = make_feed(runner.input_info(), batch=2)
        start = time.perf_counter()
        m = measure(runner, feed, batch=2, warmup_s=0.3, iterations=15)
        wall = time.perf_counter() - start
    s = m.stats()
    assert s.count == 15 == len(m.timings)
    assert m.warmup_iterations >= 1 and m.warmup_s >= 0.3
    assert 0 < s.min_ms <= s.median_ms <= s.p90_ms <= s.p95_ms <= s.p99_ms <= s.max_ms
    assert s.throughput == pytest.approx(2 * 1000 / s.mean_ms)
    # the recorded latencies account for the measured wall time (host clock, nothing dropped)
    assert sum(m.latencies_ms()) / 1e3 <= m.wall_s <= wall
    assert m.split_stats() == {}  # CPU runner: host time only, no H2D/compute/D2H split


def test_interleaved_rounds_alternate_the_runners(effnet_onnx: Path, tmp_path: Path) -> None:
    """Two real ORT runners timed in alternating rounds: the calls really alternate block by block (so load
    from other jobs hits both alike), and each gets its iterations."""
    import onnx

    calls: list[str] = []
    second = tmp_path / "copy.onnx"
    onnx.save(onnx.load(str(effnet_onnx)), str(second))
    with OrtRunner(effnet_onnx, threads=1) as a, OrtRunner(second, threads=1) as b:
        for runner, tag in ((a, "a"), (b, "b")):
            timed = runner.timed_iteration

            def logged(feed: object, timed: object = timed, tag: str = tag) -> object:
                calls.append(tag)
                return timed(feed)  # type: ignore[operator]

            runner.timed_iteration = logged  # type: ignore[method-assign]
        feed = make_feed(a.input_info(), batch=1)
        ma, mb = measure_interleaved([(a, feed), (b, feed)], warmup_s=0.0, iterations=6, rounds=3)
    assert len(ma.timings) >= 6 and len(mb.timings) >= 6
    blocks = [tag for i, tag in enumerate(calls) if i == 0 or calls[i - 1] != tag]
    assert blocks == ["a", "b"] * 3  # three rounds, each runner once per round


def test_duration_extends_beyond_iterations(effnet_onnx: Path) -> None:
    with OrtRunner(effnet_onnx, threads=2) as runner:
        feed = make_feed(runner.input_info(), batch=1)
        m = measure(runner, feed, warmup_s=0.0, iterations=2, duration_s=0.4)
    assert m.wall_s >= 0.4 and len(m.timings) > 2


def test_ort_infer_matches_torch(
    effnet_onnx: Path, effnet_model: torch.nn.Module, photo_batch: np.ndarray
) -> None:
    feed = {"images": photo_batch[:4]}
    with OrtRunner(effnet_onnx) as ort_runner:
        ort_out = ort_runner.infer(feed)["logits"]
    with TorchRunner(effnet_model, IMAGES, threads=2) as torch_runner:
        torch_out = torch_runner.infer(feed)["output0"]
        m = measure(torch_runner, feed, batch=4, warmup_s=0.1, iterations=3)
    np.testing.assert_allclose(ort_out, torch_out, atol=1e-3)
    assert m.stats().count == 3 and m.stats().min_ms > 0


def test_torchscript_file_runner(tmp_path: Path) -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    path = tmp_path / "net.pt"
    torch.jit.save(torch.jit.trace(net, torch.randn(1, 3, 32, 32)), str(path))
    info = [RunnerTensor("x", np.dtype(np.float32), ("batch", 3, 32, 32))]
    feed = make_feed(info, batch=2)
    with TorchRunner(path, info) as runner:
        out = runner.infer(feed)["output0"]
    np.testing.assert_allclose(out, net(torch.from_numpy(feed["x"])).detach().numpy(), atol=1e-5)


def test_feed_uses_real_photos_never_zeros() -> None:
    feed = make_feed(IMAGES, batch=3, seed=4)
    x = feed["images"]
    assert x.shape == (3, 3, 224, 224) and x.dtype == np.float32
    assert np.abs(x).mean() > 0.1 and not np.array_equal(x[0], x[1])
    np.testing.assert_array_equal(make_feed(IMAGES, batch=3, seed=4)["images"], x)  # seeded, reproducible
    ids = make_feed([RunnerTensor("ids", np.dtype(np.int64), ("batch", 16))], batch=2)["ids"]
    assert ids.dtype == np.int64 and ids.min() >= 1


def test_feed_from_npz_cycles_rows(tmp_path: Path, photo_batch: np.ndarray) -> None:
    np.savez(tmp_path / "d.npz", images=photo_batch[:3])
    feed = make_feed(IMAGES, batch=5, data=tmp_path / "d.npz")
    np.testing.assert_array_equal(feed["images"][3], photo_batch[0])
    with pytest.raises(TrtbuildError, match="no array named 'images'"):
        np.savez(tmp_path / "bad.npz", pixels=photo_batch[:1])
        make_feed(IMAGES, batch=1, data=tmp_path / "bad.npz")


def test_accuracy_feeds_are_distinct_samples(tmp_path: Path, photo_batch: np.ndarray) -> None:
    feeds = accuracy_feeds(IMAGES, samples=10, chunk=4)
    assert [f["images"].shape[0] for f in feeds] == [4, 4, 2]
    flat = np.concatenate([f["images"] for f in feeds])
    assert len({flat[i].tobytes() for i in range(10)}) == 10
    np.save(tmp_path / "x.npy", photo_batch[:6])
    feeds = accuracy_feeds(IMAGES, samples=10, data=tmp_path / "x.npy", chunk=4)
    np.testing.assert_array_equal(np.concatenate([f["images"] for f in feeds]), photo_batch[:6])

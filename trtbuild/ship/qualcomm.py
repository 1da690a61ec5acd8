"""Qualcomm SNPE / QNN / AI Hub handoff: a converter-ready ONNX, AIMET encodings, raw calibration inputs.

Layout of the handoff folder (written atomically)::

    model.onnx                static batch 1, opset <= 21, no int64 inputs, no dynamic-quantization ops
    model.encodings           AIMET 1.0.0 (what current converters and AI Hub read)
    model_0.6.1.encodings     AIMET 0.6.1 (older SNPE releases)
    raw/<input>_<i>.raw       float32 little-endian calibration samples, layout per converter
    input_list.txt            absolute paths (``name:=path`` per input when there are several)
    convert.sh                snpe-onnx-to-dlc -> snpe-dlc-quant -> snpe-dlc-graph-prepare, or qairt-*
    model.aimet/              AI Hub upload: exactly one .onnx and one .encodings
    handoff.json              what was written and how
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from calibrators import encodings as enc
from calibrators.ranges import RangeSet
from trtbuild.core.atomic import atomic_dir
from trtbuild.core.errors import TrtbuildError
from trtbuild.core.onnx_file import constants_to_initializers, opset_of
from trtbuild.ship import qualcomm_scripts

MAX_OPSET = 21
CONVERTERS = ("snpe", "qairt")  # snpe: legacy snpe-onnx-to-dlc (NHWC raw inputs); qairt keeps the ONNX layout
DYNAMIC_QUANT_OPS = {
    "DynamicQuantizeLinear",
    "DynamicQuantizeMatMul",
    "DynamicQuantizeLSTM",
    "MatMulInteger",
    "ConvInteger",
    "QLinearConv",
    "QLinearMatMul",
    "QuantizeLinear",
    "DequantizeLinear",
}


@dataclass(frozen=True)
class QualcommHandoff:
    folder: Path
    onnx: Path
    encodings: Path  # 1.0.0
    encodings_061: Path
    input_list: Path
    script: Path
    aimet_folder: Path
    inputs: dict[str, tuple[int, ...]]  # static input shapes (ONNX layout)
    converter: str
    samples: int


# ---- ONNX preparation -------------------------------------------------------------------------------------


def qualcomm_ready_onnx(
    model: onnx.ModelProto,
    cast_int64: bool = True,
    data_shapes: Mapping[str, Sequence[int]] | None = None,
) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` the Qualcomm converters accept, and notes on what changed.

    Batch (axis 0) becomes 1; any other symbolic dim takes its size from ``data_shapes`` (the calibration
    samples' shape per input: a third-party reader with dynamic height/width is deployed at the size it
    is calibrated at), else is refused (the converters need static shapes); int64 inputs become int32
    followed by a Cast (or are refused when ``cast_int64`` is False).
    """
    opset = opset_of(model)
    if opset > MAX_OPSET:
        raise TrtbuildError(
            f"model uses opset {opset}; Qualcomm converters accept opset <= {MAX_OPSET}",
            "re-export with opset 17",
        )
    bad = sorted({n.op_type for n in model.graph.node if n.op_type in DYNAMIC_QUANT_OPS})
    if bad:
        raise TrtbuildError(
            f"model already contains quantization ops ({', '.join(bad)})",
            "export the float model; the AIMET encodings carry the quantization for Qualcomm",
        )
    out = onnx.ModelProto()
    out.CopyFrom(model)
    notes: list[str] = []
    # Third-party exports (Paddle2ONNX, old TorchScript) hold weights in Constant nodes: as initializers
    # they get their param encodings, and the converters see them as weights.
    if moved := constants_to_initializers(out.graph):
        notes.append(f"{moved} Constant nodes -> initializers (weights get param encodings)")
    inits = {t.name for t in out.graph.initializer}
    fixed: set[str] = set()
    for inp in out.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                continue
            size = 1
            if axis != 0:
                given = (data_shapes or {}).get(inp.name)
                if given is None or len(given) != len(dims):
                    raise TrtbuildError(
                        f"input '{inp.name}' has a dynamic dimension {axis} ('{dim.dim_param}')",
                        "give calibration samples of the deployed size (--calib-data: .npy/.npz), or export "
                        "with a fixed input shape for Qualcomm",
                    )
                size = int(given[axis])
                notes.append(f"input '{inp.name}': dimension {axis} fixed to {size} (as calibrated)")
            else:
                notes.append(f"input '{inp.name}': batch fixed to 1")
            if dim.dim_param:
                fixed.add(dim.dim_param)
            dim.Clear()
            dim.dim_value = size
    _cast_int64_inputs(out, cast_int64, notes)
    for tensor in out.graph.output:  # the same symbolic batch on outputs is now 1 too
        for dim in tensor.type.tensor_type.shape.dim:
            if dim.dim_param and dim.dim_param in fixed:
                dim.Clear()
                dim.dim_value = 1
    del out.graph.value_info[:]
    out = onnx.shape_inference.infer_shapes(out, strict_mode=True)
    onnx.checker.check_model(out)
    return out, notes


def _cast_int64_inputs(model: onnx.ModelProto, cast: bool, notes: list[str]) -> None:
    for inp in model.graph.input:
        if inp.type.tensor_type.elem_type != TensorProto.INT64:
            continue
        if not cast:
            raise TrtbuildError(
                f"input '{inp.name}' is int64, which Qualcomm runtimes do not take",
                "allow the int32 cast or change the model's input type",
            )
        inner = f"{inp.name}__int64"
        for node in model.graph.node:
            for i, name in enumerate(node.input):
                if name == inp.name:
                    node.input[i] = inner
        inp.type.tensor_type.elem_type = TensorProto.INT32
        model.graph.node.insert(
            0,
            helper.make_node("Cast", [inp.name], [inner], to=TensorProto.INT64, name=f"{inp.name}_to_int64"),
        )
        notes.append(f"input '{inp.name}': int64 -> int32 (+ Cast inside the graph)")


def static_input_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    inits = {t.name for t in model.graph.initializer}
    return {
        i.name: tuple(d.dim_value for d in i.type.tensor_type.shape.dim)
        for i in model.graph.input
        if i.name not in inits
    }


# ---- calibration inputs ------------------------------------------------------------------------------------


def raw_layout(converter: str, shape: Sequence[int]) -> str:
    """NHWC for 4-D inputs of the legacy snpe-onnx-to-dlc; ONNX layout (NCHW) for qairt-converter."""
    return "NHWC" if converter == "snpe" and len(shape) == 4 else "ONNX"


def write_raw_inputs(
    samples: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, ...]],
    folder: Path,
    converter: str,
    list_root: Path,
) -> tuple[Path, int]:
    """One .raw per input per sample, and input_list.txt with absolute paths under ``list_root``.

    ``samples[name]`` has shape (N, *shape[1:]) in ONNX layout; files are written in the layout the
    converter expects. ``list_root`` is the folder's final location (it is written via a temp folder).
    """
    missing = set(shapes) - set(samples)
    if missing:
        raise TrtbuildError(
            f"no calibration samples for input(s) {sorted(missing)}", "give one array per model input"
        )
    counts = {len(np.asarray(samples[n])) for n in shapes}
    if len(counts) != 1 or 0 in counts:
        raise TrtbuildError(
            "calibration inputs have different or zero sample counts",
            "give the same number of samples (>= 1) for every input",
        )
    n = counts.pop()
    raw_dir = folder / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    for i in range(n):
        parts: list[str] = []
        for name, shape in shapes.items():
            sample = np.asarray(samples[name])[i]
            if tuple(sample.shape) != tuple(shape[1:]):
                raise TrtbuildError(
                    f"calibration sample for '{name}' has shape {sample.shape}, "
                    f"the model wants {tuple(shape[1:])}",
                    "resize the calibration data",
                )
            if raw_layout(converter, shape) == "NHWC":
                sample = np.transpose(sample, (1, 2, 0))
            safe = name.replace("/", "_").replace(":", "_")
            fname = f"{safe}_{i:04d}.raw"
            np.ascontiguousarray(sample, dtype="<f4").tofile(raw_dir / fname)
            path = (list_root / "raw" / fname).as_posix()
            parts.append(f"{name}:={path}" if len(shapes) > 1 else path)
        lines.append(" ".join(parts))
    list_path = folder / "input_list.txt"
    list_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return list_path, n


# ---- the whole handoff ------------------------------------------------------------------------------------


def export_qualcomm(
    model_path: str | os.PathLike[str],
    ranges: RangeSet,
    calibration: Any,
    out_dir: str | os.PathLike[str],
    converter: str = "snpe",
    htp_socs: str = "sm8650",
    activation_symmetric: bool = False,
    max_samples: int = 16,
    cast_int64: bool = True,
) -> QualcommHandoff:
    """Write the Qualcomm handoff folder for ``model_path`` (float ONNX) calibrated as ``ranges``.

    ``calibration`` holds float samples in ONNX layout: an (N, ...) array for a single-input model, a dict
    of arrays by input name, or anything :func:`calibrators.data.open_data` reads (image folder, .npy/.npz);
    the first ``max_samples`` become .raw files for snpe-dlc-quant / qairt-quantizer.
    """
    if converter not in CONVERTERS:
        raise TrtbuildError(f"unknown converter '{converter}'", f"use one of {', '.join(CONVERTERS)}")
    try:
        src = onnx.load(str(model_path))
    except Exception as exc:
        raise TrtbuildError(f"cannot read ONNX model {model_path}: {exc}", "pass a valid .onnx file") from exc
    names = [i.name for i in src.graph.input if i.name not in {t.name for t in src.graph.initializer}]
    samples = _load_samples(calibration, src, dict.fromkeys(names, ()), max_samples)
    data_shapes = {name: (1, *np.asarray(v).shape[1:]) for name, v in samples.items()}
    model, notes = qualcomm_ready_onnx(src, cast_int64, data_shapes)
    shapes = static_input_shapes(model)
    ranges.check_fits(model, f"'{Path(model_path).name}'")
    encodings = enc.build_encodings(model, ranges, activation_symmetric)
    stem = Path(model_path).stem
    final = Path(out_dir).resolve()
    with atomic_dir(final) as tmp:
        onnx_path = tmp / f"{stem}.onnx"
        onnx.save(model, str(onnx_path))
        enc.write_encodings(encodings, tmp / f"{stem}.encodings", "1.0.0")
        enc.write_encodings(encodings, tmp / f"{stem}_0.6.1.encodings", "0.6.1")
        list_path, n = write_raw_inputs(samples, shapes, tmp, converter, final)
        aimet = tmp / f"{stem}.aimet"
        aimet.mkdir()
        shutil.copy2(onnx_path, aimet / f"{stem}.onnx")
        shutil.copy2(tmp / f"{stem}.encodings", aimet / f"{stem}.encodings")
        check_aimet_folder(aimet)
        script = tmp / "convert.sh"
        script_text = qualcomm_scripts.convert_script(stem, shapes, converter, htp_socs)
        script.write_text(script_text, encoding="utf-8")
        script.chmod(0o755)
        info: dict[str, Any] = {
            "format": 1,
            "converter": converter,
            "htp_socs": htp_socs,
            "opset": opset_of(model),
            "inputs": {k: list(v) for k, v in shapes.items()},
            "raw_layout": {k: raw_layout(converter, v) for k, v in shapes.items()},
            "samples": n,
            "activation_encoding": "symmetric int8" if activation_symmetric else "asymmetric uint8",
            "weights": "per-channel symmetric int8",
            "calibration_method": ranges.method,
            "activations_encoded": len(encodings.activations),
            "params_encoded": len(encodings.params),
            "notes": notes,
        }
        (tmp / "handoff.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return QualcommHandoff(
        final,
        final / f"{stem}.onnx",
        final / f"{stem}.encodings",
        final / f"{stem}_0.6.1.encodings",
        final / list_path.name,
        final / "convert.sh",
        final / f"{stem}.aimet",
        shapes,
        converter,
        n,
    )


def _load_samples(
    calibration: Any, model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], max_samples: int
) -> dict[str, np.ndarray]:
    if isinstance(calibration, np.ndarray):
        if len(shapes) != 1:
            raise TrtbuildError(
                f"model has {len(shapes)} inputs but one calibration array was given",
                "pass a dict of arrays by input name",
            )
        calibration = {next(iter(shapes)): calibration}
    if not isinstance(calibration, Mapping):
        from calibrators.data import model_inputs, open_data

        rows: list[dict[str, np.ndarray]] = []
        for _, sample in open_data(calibration, model_inputs(model)).samples():
            rows.append(sample)
            if len(rows) >= max_samples:
                break
        calibration = {name: np.concatenate([r[name] for r in rows]) for name in shapes} if rows else {}
    return {k: np.asarray(v, dtype=np.float32)[:max_samples] for k, v in calibration.items()}


def check_aimet_folder(folder: Path) -> None:
    """AI Hub's rule for a .aimet upload: exactly one .onnx, at most one .encodings and one .data."""
    files = [p for p in folder.iterdir() if p.is_file()]
    counts = {ext: sum(p.suffix == ext for p in files) for ext in (".onnx", ".encodings", ".data")}
    if counts[".onnx"] != 1 or counts[".encodings"] > 1 or counts[".data"] > 1:
        raise TrtbuildError(
            f"{folder.name} holds {counts}; AI Hub wants exactly one .onnx, at most one "
            ".encodings and one .data",
            "remove the extra files",
        )


def simulated_fidelity(handoff: QualcommHandoff, samples: Any, max_samples: int = 16) -> dict[str, Any]:
    """How far the encodings move the model's first output from FP32, simulated in ONNX Runtime (exact
    Q/DQ semantics, no fusions): top-1 agreement, mean cosine similarity, max abs difference. Goes into the
    bundle manifest's ``fidelity``; the device's own numbers come from the Qualcomm tools."""
    import onnxruntime as ort

    model = onnx.load(str(handoff.onnx))
    doc = enc.load_encodings(handoff.encodings, model)
    acts = {
        e["name"]: enc.Encoding(tuple(e["scale"]), tuple(e["offset"]), e["is_sym"])
        for e in doc["activation_encodings"]
    }
    sim = enc.simulate(model, enc.EncodingSet(acts, enc.weight_encodings(model)))
    data = _load_samples(samples, model, handoff.inputs, max_samples)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    runs = [
        ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        for m in (model, sim)
    ]
    n = min(len(v) for v in data.values())
    ref, got = (
        [s.run(None, {k: v[i : i + 1] for k, v in data.items()})[0].reshape(-1) for i in range(n)]
        for s in runs
    )
    a, b = np.stack(ref), np.stack(got)
    cos = np.sum(a * b, 1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return {
        "samples": n,
        "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
        "mean_cosine": float(cos.mean()),
        "max_abs_diff": float(np.abs(a - b).max()),
        "simulated": "onnxruntime Q/DQ of the AIMET encodings",
    }

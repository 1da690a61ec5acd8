"""AIMET quantization encodings (formats 0.6.1 and 1.0.0) from our ranges, and our own validator.

Qualcomm's converters (`snpe-onnx-to-dlc --quantization_overrides`, `qairt-converter`) and AI Hub read these
files. Convention (AIMET): real = (q + offset) * scale with q unsigned in [0, 2^bw - 1], so offset <= 0
(offset = -zero point) and a symmetric int8 encoding is written with offset -128.

Activations: asymmetric uint8 over ``TensorRange.clipped()`` (what Qualcomm HTP runs best) unless symmetric
is asked for. Weights: per-channel symmetric int8 from the initializers, on the output-channel axis.
AIMET's own loader accepts a wrong-signed offset or a string where a boolean belongs without complaint,
so :func:`validate_encodings` checks signs, types, list lengths and ranges itself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from calibrators import qdq_rules
from calibrators import weights as wq
from calibrators.ranges import RangeSet
from trtbuild.core import atomic
from trtbuild.core.errors import TrtbuildError

FORMATS = ("0.6.1", "1.0.0")
BITWIDTH = 8
_LEVELS = 2**BITWIDTH - 1  # 255 steps between min and max
_SYM_OFFSET = -(2 ** (BITWIDTH - 1))  # -128


@dataclass(frozen=True)
class Encoding:
    """One quantizer: per-tensor (one entry) or per-channel (one entry per channel)."""

    scale: tuple[float, ...]
    offset: tuple[int, ...]
    symmetric: bool
    bitwidth: int = BITWIDTH
    axis: int | None = None  # channel axis for per-channel weights

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    def min_max(self) -> list[tuple[float, float]]:
        """The float range each (scale, offset) represents: min = offset * scale, max = min + 255 * scale."""
        levels = 2**self.bitwidth - 1
        return [(o * s, o * s + levels * s) for s, o in zip(self.scale, self.offset, strict=True)]


@dataclass(frozen=True)
class EncodingSet:
    activations: dict[str, Encoding]
    params: dict[str, Encoding]


# ---- computing encodings ----


def asymmetric(lo: float, hi: float) -> Encoding:
    """uint8 encoding covering [lo, hi] (which must contain 0) with zero exactly representable."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo <= 0:
        hi = lo + 1e-8  # a constant-zero tensor: any tiny positive scale represents it exactly
    scale = (hi - lo) / _LEVELS
    offset = int(round(lo / scale))
    return Encoding((float(scale),), (min(offset, 0),), symmetric=False)


def symmetric(amax: float) -> Encoding:
    scale = amax / (2 ** (BITWIDTH - 1) - 1) if amax > 0 else 1e-8
    return Encoding((float(scale),), (_SYM_OFFSET,), symmetric=True)


def weight_encodings(model: onnx.ModelProto) -> dict[str, Encoding]:
    """Per-channel symmetric int8 encodings for Conv/ConvTranspose/Gemm/MatMul weight initializers."""
    inits = {t.name: t for t in model.graph.initializer}
    result: dict[str, Encoding] = {}
    for node in model.graph.node:
        if len(node.input) < 2 or node.input[1] not in inits or node.input[1] in result:
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        axis = qdq_rules.weight_axis(node.op_type, attrs, weight.ndim)
        if axis is None or weight.dtype.kind != "f":
            continue
        scales = wq.per_channel_scales(weight, axis)  # the scales the Q/DQ graph stores
        result[node.input[1]] = Encoding(
            tuple(float(s) for s in scales), (_SYM_OFFSET,) * len(scales), symmetric=True, axis=axis
        )
    return result


def activation_encodings(
    ranges: RangeSet, tensor_names: set[str] | None = None, activation_symmetric: bool = False
) -> dict[str, Encoding]:
    """Encodings for every calibrated tensor (optionally only those present in the graph)."""
    result: dict[str, Encoding] = {}
    for name, rng in ranges.items():
        if tensor_names is not None and name not in tensor_names:
            continue
        result[name] = symmetric(rng.amax) if activation_symmetric else asymmetric(*rng.clipped())
    return result


def graph_tensor_names(model: onnx.ModelProto) -> set[str]:
    names = {i.name for i in model.graph.input}
    for node in model.graph.node:
        names.update(o for o in node.output if o)
    return names


_FUSING_PRODUCERS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "BatchNormalization"}
_FUSED_ACTIVATIONS = {"Relu", "Clip"}


def activation_tensor_names(model: onnx.ModelProto) -> set[str]:
    """Tensors that get an activation encoding: graph inputs and node outputs, except constants and
    outputs the Qualcomm converters fuse away (a Conv/Gemm/Add whose only reader is a Relu/Clip runs as
    one op, so only the activation's output is quantized; encoding the wide pre-activation range would
    crush the [0, 6] values that matter)."""
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    outputs = {o.name for o in model.graph.output}
    inits = {t.name for t in model.graph.initializer}
    names = {i.name for i in model.graph.input if i.name not in inits}
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        for out in node.output:
            fused = (
                node.op_type in _FUSING_PRODUCERS
                and out not in outputs
                and len(readers.get(out, [])) == 1
                and readers[out][0] in _FUSED_ACTIVATIONS
            )
            if out and not fused:
                names.add(out)
    return names


def qualcomm_activation_tensors(model: onnx.ModelProto | str | Path) -> list[str]:
    """The float tensors a Qualcomm handoff encodes, in graph order: pass them to ``calibrate(...,
    tensors=...)`` (its default measures only TensorRT's Q/DQ inputs; HTP quantizes every activation)."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    }
    wanted = activation_tensor_names(proto)
    ordered = [i.name for i in proto.graph.input] + [o for n in proto.graph.node for o in n.output]
    return [t for t in ordered if t in wanted and types.get(t) == onnx.TensorProto.FLOAT]


def build_encodings(
    model: onnx.ModelProto, ranges: RangeSet, activation_symmetric: bool = False
) -> EncodingSet:
    """All encodings for ``model``: calibrated activations present in it + per-channel weights."""
    acts = activation_encodings(ranges, activation_tensor_names(model), activation_symmetric)
    if not acts:
        raise TrtbuildError(
            "none of the calibrated tensor names occur in the model",
            "calibrate the same ONNX you export for Qualcomm (tensor names must match)",
        )
    return EncodingSet(acts, weight_encodings(model))


# ---- writing ----


def _entries_061(enc: Encoding) -> list[dict[str, Any]]:
    return [
        {
            "bitwidth": enc.bitwidth,
            "dtype": "int",
            "is_symmetric": "True" if enc.symmetric else "False",
            "max": hi,
            "min": lo,
            "offset": off,
            "scale": s,
        }
        for (lo, hi), off, s in zip(enc.min_max(), enc.offset, enc.scale, strict=True)
    ]


def _entry_100(name: str, enc: Encoding) -> dict[str, Any]:
    return {
        "name": name,
        "bw": enc.bitwidth,
        "dtype": "INT",
        "enc_type": "PER_CHANNEL" if enc.per_channel else "PER_TENSOR",
        "is_sym": enc.symmetric,
        "offset": list(enc.offset),
        "scale": list(enc.scale),
    }


def _quantizer_args(activation_symmetric: bool) -> dict[str, Any]:
    return {
        "activation_bitwidth": BITWIDTH,
        "param_bitwidth": BITWIDTH,
        "dtype": "int",
        "per_channel_quantization": True,
        "quant_scheme": "post_training_tf",
        "is_symmetric": activation_symmetric,
        "strict_symmetric": False,
        "unsigned_symmetric": False,
    }


def to_json(encodings: EncodingSet, version: str) -> dict[str, Any]:
    """The encodings document in AIMET format ``version`` ("0.6.1" or "1.0.0")."""
    sym = any(e.symmetric for e in encodings.activations.values())
    if version == "0.6.1":
        return {
            "version": "0.6.1",
            "activation_encodings": {n: _entries_061(e) for n, e in encodings.activations.items()},
            "param_encodings": {n: _entries_061(e) for n, e in encodings.params.items()},
            "excluded_layers": [],
            "quantizer_args": _quantizer_args(sym),
        }
    if version == "1.0.0":
        return {
            "version": "1.0.0",
            "activation_encodings": [_entry_100(n, e) for n, e in encodings.activations.items()],
            "param_encodings": [_entry_100(n, e) for n, e in encodings.params.items()],
            "excluded_layers": [],
            "quantizer_args": _quantizer_args(sym),
        }
    raise TrtbuildError(f"unknown AIMET encodings version '{version}'", f"use one of {', '.join(FORMATS)}")


def write_encodings(encodings: EncodingSet, path: str | Path, version: str) -> Path:
    """Validate, then write atomically (an invalid document is never written)."""
    doc = to_json(encodings, version)
    validate_encodings(doc)
    return atomic.write_text(path, json.dumps(doc, indent=1) + "\n")


# ---- validating ----


def _fail(where: str, problem: str) -> TrtbuildError:
    return TrtbuildError(
        f"invalid AIMET encodings: {where}: {problem}", "regenerate the encodings with `trtbuild export-snpe`"
    )


def _check_number(where: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(where, f"'{key}' must be a finite number, got {value!r}")
    return float(value)


def _check_int(where: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, f"'{key}' must be an integer, got {value!r}")
    return value


def _check_quant(where: str, scale: float, offset: int, sym: bool, bw: int) -> None:
    if scale <= 0:
        raise _fail(where, f"scale must be > 0, got {scale}")
    if offset > 0:
        raise _fail(where, f"offset must be <= 0 (offset = -zero point), got {offset}")
    if offset < -(2**bw - 1):
        raise _fail(where, f"offset {offset} is outside the {bw}-bit range")
    if sym and offset != -(2 ** (bw - 1)):
        raise _fail(where, f"a symmetric {bw}-bit encoding must have offset {-(2 ** (bw - 1))}, got {offset}")


def _validate_061_entry(where: str, entry: Any) -> None:
    if not isinstance(entry, dict):
        raise _fail(where, "each encoding must be an object")
    missing = {"bitwidth", "dtype", "is_symmetric", "min", "max", "offset", "scale"} - set(entry)
    if missing:
        raise _fail(where, f"missing fields {sorted(missing)}")
    if entry["is_symmetric"] not in ("True", "False"):
        raise _fail(
            where,
            f'\'is_symmetric\' must be the string "True" or "False" in 0.6.1, got {entry["is_symmetric"]!r}',
        )
    if entry["dtype"] not in ("int", "float"):
        raise _fail(where, f'\'dtype\' must be "int" or "float", got {entry["dtype"]!r}')
    bw = _check_int(where, "bitwidth", entry["bitwidth"])
    lo = _check_number(where, "min", entry["min"])
    hi = _check_number(where, "max", entry["max"])
    scale = _check_number(where, "scale", entry["scale"])
    offset = _check_int(where, "offset", entry["offset"])
    if entry["dtype"] == "float":
        return
    if not lo <= 0.0 <= hi:
        raise _fail(where, f"range [{lo}, {hi}] must contain 0 (min <= 0 <= max)")
    _check_quant(where, scale, offset, entry["is_symmetric"] == "True", bw)
    if not math.isclose(lo, offset * scale, rel_tol=1e-4, abs_tol=1e-7):
        raise _fail(where, f"min {lo} does not equal offset * scale ({offset * scale})")


def _validate_100_entry(where: str, entry: Any, channels: Mapping[str, int]) -> None:
    if not isinstance(entry, dict):
        raise _fail(where, "each encoding must be an object")
    missing = {"name", "bw", "dtype", "enc_type", "is_sym", "offset", "scale"} - set(entry)
    if missing:
        raise _fail(where, f"missing fields {sorted(missing)}")
    if not isinstance(entry["is_sym"], bool):
        raise _fail(where, f"'is_sym' must be a JSON boolean in 1.0.0, got {entry['is_sym']!r}")
    if entry["dtype"] not in ("INT", "FLOAT"):
        raise _fail(where, f'\'dtype\' must be "INT" or "FLOAT", got {entry["dtype"]!r}')
    if entry["enc_type"] not in ("PER_TENSOR", "PER_CHANNEL"):
        raise _fail(where, f"'enc_type' must be PER_TENSOR or PER_CHANNEL, got {entry['enc_type']!r}")
    bw = _check_int(where, "bw", entry["bw"])
    if entry["dtype"] == "FLOAT":
        return
    scales, offsets = entry["scale"], entry["offset"]
    if not isinstance(scales, list) or not isinstance(offsets, list) or len(scales) != len(offsets):
        raise _fail(where, "'scale' and 'offset' must be lists of the same length")
    expected = channels.get(entry["name"], len(scales)) if entry["enc_type"] == "PER_CHANNEL" else 1
    if len(scales) != expected or not scales:
        raise _fail(where, f"{entry['enc_type']} needs {expected} scale(s), got {len(scales)}")
    for s, o in zip(scales, offsets, strict=True):
        scale, offset = _check_number(where, "scale", s), _check_int(where, "offset", o)
        _check_quant(where, scale, offset, entry["is_sym"], bw)


def validate_encodings(doc: Mapping[str, Any], model: onnx.ModelProto | None = None) -> None:
    """Raise TrtbuildError naming the first problem; with ``model``, also check names and channel counts."""
    version = doc.get("version")
    if version not in FORMATS:
        raise _fail("version", f"must be one of {', '.join(FORMATS)}, got {version!r}")
    channels: dict[str, int] = {}
    names: set[str] | None = None
    if model is not None:
        names = graph_tensor_names(model) | {t.name for t in model.graph.initializer}
        for name, enc in weight_encodings(model).items():
            channels[name] = len(enc.scale)
    for section in ("activation_encodings", "param_encodings"):
        body = doc.get(section)
        if version == "0.6.1":
            if not isinstance(body, dict):
                raise _fail(section, "must be an object mapping tensor name -> list of encodings")
            for name, entries in body.items():
                where = f"{section}['{name}']"
                if not isinstance(entries, list) or not entries:
                    raise _fail(where, "must be a non-empty list")
                if names is not None and name not in names:
                    raise _fail(where, "no tensor of that name in the model")
                if name in channels and len(entries) not in (1, channels[name]):
                    raise _fail(
                        where,
                        f"per-channel list has {len(entries)} entries, weight has {channels[name]} channels",
                    )
                for i, entry in enumerate(entries):
                    _validate_061_entry(f"{where}[{i}]", entry)
        else:
            if not isinstance(body, list):
                raise _fail(section, "must be a list of encodings in 1.0.0")
            for i, entry in enumerate(body):
                where = f"{section}[{i}]"
                if isinstance(entry, dict) and names is not None and entry.get("name") not in names:
                    raise _fail(where, f"no tensor named {entry.get('name')!r} in the model")
                _validate_100_entry(where, entry, channels)


def load_encodings(path: str | Path, model: onnx.ModelProto | None = None) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrtbuildError(
            f"cannot read encodings file {path}: {exc}", "pass a JSON encodings file"
        ) from exc
    if not isinstance(doc, dict):
        raise _fail(str(path), "top level must be an object")
    validate_encodings(doc, model)
    return doc


# ---- simulating ----


def simulate(model: onnx.ModelProto, encodings: EncodingSet) -> onnx.ModelProto:
    """A Q/DQ ONNX that computes what ``encodings`` mean on ``model`` (fake quantization in ORT).

    Each encoded tensor is followed by QuantizeLinear -> DequantizeLinear and its consumers read the
    dequantized copy; an encoded graph output is returned dequantized, as the device returns it.
    Activations are per tensor (uint8, zero point = -offset; symmetric int8 as zero point 0), weights per
    channel (int8, zero point 0, on the encoding's axis). Used to measure fidelity before the Qualcomm
    tools ever see the model, and as the reference an independent consumer must match.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    new_nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    renamed: dict[str, str] = {}
    graph_outputs = {o.name for o in graph.output}
    for name, e in [*encodings.activations.items(), *encodings.params.items()]:
        scale: np.ndarray = np.asarray(e.scale, np.float32)
        # symmetric int8 (offset -128 on unsigned q) is int8 with zero point 0
        zp: np.ndarray = (
            np.zeros(len(e.scale), np.int8) if e.symmetric else np.asarray([-o for o in e.offset], np.uint8)
        )
        if not e.per_channel:
            scale, zp = scale.reshape(()), zp.reshape(())
        s_name, z_name, q_name, dq_name = (f"{name}__{k}" for k in ("scale", "zp", "q", "dq"))
        inits += [numpy_helper.from_array(scale, s_name), numpy_helper.from_array(zp, z_name)]
        axis: dict[str, Any] = {"axis": e.axis} if e.per_channel else {}
        source = name
        if name in graph_outputs:  # the device returns the quantized output: DQ takes over the output's name
            source, dq_name = f"{name}__float", name
            for node in graph.node:
                node.output[:] = [source if o == name else o for o in node.output]
        q = onnx.helper.make_node("QuantizeLinear", [source, s_name, z_name], [q_name], name=q_name, **axis)
        dq = onnx.helper.make_node(
            "DequantizeLinear", [q_name, s_name, z_name], [dq_name], name=dq_name, **axis
        )
        new_nodes += [q, dq]
        if dq_name != name:
            renamed[name] = dq_name
    for node in graph.node:
        for i, tensor in enumerate(node.input):
            if tensor in renamed:
                node.input[i] = renamed[tensor]
    original = list(graph.node)
    del graph.node[:]
    # Q/DQ of graph inputs and initializers first; each activation Q/DQ right after its producer.
    by_source = {n.input[0]: n for n in new_nodes if n.op_type == "QuantizeLinear"}
    dq_of = {n.input[0]: n for n in new_nodes if n.op_type == "DequantizeLinear"}
    producers = {o for n in original for o in n.output}
    for name, q in by_source.items():
        if name not in producers:
            graph.node.extend([q, dq_of[q.output[0]]])
    for node in original:
        graph.node.append(node)
        for o in node.output:
            if o in by_source:
                graph.node.extend([by_source[o], dq_of[by_source[o].output[0]]])
    graph.initializer.extend(inits)
    return out

"""The export and prepare pipelines the CLI and the demo call: load -> export -> prepare -> verify -> write.

Everything is staged in a temp folder beside the output and moves into place only after verification
passes, so a failure at any step leaves no ONNX file and no sidecar behind.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.meta import (
    DEFAULT_MAX_BATCH,
    ExportMeta,
    file_sha256,
    graph_outputs,
    meta_path,
    specs_from_graph,
    write_export_meta,
)
from export.prepare import (
    PrepareReport,
    default_opset,
    load_onnx,
    prepare_model,
    save_onnx,
    staged_onnx,
)
from export.settings import DEFAULT_OPSET, ExportSettings
from export.sources import ModelSource, load_torch_model, resolve_source
from export.torch_export import default_output_names, export_torch
from export.verify import (
    VerifyResult,
    load_verify_data,
    ort_runner,
    random_inputs,
    standard_cases,
    torch_runner,
    verify,
)
from trtbuild.core.console import progress
from trtbuild.core.defaults import OUTPUT_ROOT
from trtbuild.core.errors import TrtbuildError
from trtbuild.core.inputs import InputSpec, fmt_shape, parse_input_spec, parse_shape
from trtbuild.core.onnx_file import fixed_size

ENGINES_DIR = OUTPUT_ROOT
VerifyData = Mapping[str, np.ndarray] | np.ndarray | str | os.PathLike[str] | None


@dataclass
class ExportResult:
    onnx_path: Path
    meta_path: Path
    meta: ExportMeta
    exporter: str
    fallback_reason: str | None  # why the dynamo exporter was not used, or None
    verification: VerifyResult
    preparation: PrepareReport
    seconds: dict[str, float] = field(default_factory=dict)  # per step: load, export, prepare, verify

    def to_json(self) -> dict[str, Any]:
        return {
            "onnx": str(self.onnx_path),
            "sidecar": str(self.meta_path),
            "exporter": self.exporter,
            "fallback_reason": self.fallback_reason,
            "seconds": self.seconds,
            **self.meta.to_json(),
        }


def build_specs(
    inputs: Sequence[InputSpec | str],
    *,
    dynamic_batch: bool = False,
    max_batch: int = DEFAULT_MAX_BATCH,
    min_shapes: Mapping[str, str | Sequence[int]] | None = None,
    max_shapes: Mapping[str, str | Sequence[int]] | None = None,
) -> list[InputSpec]:
    """Turn `--input` strings (or specs) plus dynamic-axis options into InputSpecs with min/opt/max shapes."""
    if not inputs:
        raise TrtbuildError("no model inputs were declared", "add --input name:1x3x224x224 for each input")
    specs = [parse_input_spec(s) if isinstance(s, str) else s for s in inputs]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise TrtbuildError(f"input names repeat: {', '.join(names)}", "give every --input a different name")
    for label, given in (("--min-shape", min_shapes), ("--max-shape", max_shapes)):
        unknown = sorted(set(given or {}) - set(names))
        if unknown:
            raise TrtbuildError(
                f"{label} names unknown input(s) {', '.join(unknown)}",
                f"use one of the --input names: {', '.join(names)}",
            )
    if max_batch < 1:
        raise TrtbuildError(f"--max-batch {max_batch} is not positive", "give a batch size of 1 or more")
    out = []
    for spec in specs:
        lo = _shape((min_shapes or {}).get(spec.name), "--min-shape") or spec.min
        hi = _shape((max_shapes or {}).get(spec.name), "--max-shape") or spec.max
        spec = InputSpec(spec.name, spec.opt_shape, spec.dtype, lo, hi)
        if dynamic_batch:
            spec = spec.with_dynamic_batch(max_batch)
        out.append(spec)
    return out


def _shape(value: str | Sequence[int] | None, what: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    return parse_shape(value, what) if isinstance(value, str) else tuple(int(d) for d in value)


def default_onnx_path(name: str) -> Path:
    """`engines/<name>/<name>.onnx`."""
    return ENGINES_DIR / name / f"{name}.onnx"


def export_model(
    source: str | Any,
    inputs: Sequence[InputSpec | str],
    out_path: str | os.PathLike[str] | None = None,
    settings: ExportSettings | None = None,
    *,
    weights: str | os.PathLike[str] | None = None,
    verify_inputs: VerifyData = None,
    **overrides: Any,
) -> ExportResult:
    """Export a PyTorch model to a prepared, verified ONNX file plus its `.export.json` sidecar.

    ``source``: `module:attribute`, `file.py:attribute`, a TorchScript file, or an nn.Module instance; or an
    existing `.onnx` file, which is only prepared and verified against itself (``inputs`` may then be empty).
    ``settings``: every choice of the run (export/settings.py, with its defaults); ``overrides``: settings
    fields changed for this call, e.g. ``export_model(src, inputs, out, dynamic_batch=True)``.
    ``verify_inputs``: real samples (arrays keyed by input name, one array for a single input, or an
    npy/npz path) compared on top of the seeded random inputs.
    """
    s = ExportSettings.from_overrides(settings, overrides)
    if isinstance(source, str) and resolve_source(source).kind == "onnx":
        if weights is not None:
            raise TrtbuildError("--weights does not apply to an ONNX source", "drop --weights")
        return _export_onnx_source(resolve_source(source), inputs, out_path, s, verify_inputs)
    opset = DEFAULT_OPSET if s.opset is None else s.opset
    atol, rtol = s.tolerances(against_torch=True)
    specs = build_specs(
        inputs,
        dynamic_batch=s.dynamic_batch,
        max_batch=s.max_batch,
        min_shapes=s.min_shapes,
        max_shapes=s.max_shapes,
    )
    seconds: dict[str, float] = {}
    with progress(transient=True) as bar:
        task = bar.add_task("load model", total=4)
        start = time.perf_counter()
        model, label, name = _load(source, weights)
        data = _verify_data(verify_inputs, specs)
        reference = torch_runner(model, specs)
        example = random_inputs(specs, seed=s.seed, int_high=s.int_high)
        try:
            outputs = reference(example)
        except Exception as exc:
            raise TrtbuildError(
                f"the model fails on the declared inputs ({type(exc).__name__}: {_first_line(exc)})",
                "check that --input shapes and dtypes match forward() (and --int-high for index inputs)",
            ) from exc
        names = list(s.output_names) if s.output_names else default_output_names(len(outputs))
        if len(names) != len(outputs):
            raise TrtbuildError(
                f"{len(names)} output name(s) given but the model returns {len(outputs)} tensors",
                "give one --output-name per output, or none for output, output_1, ...",
            )
        seconds["load"] = time.perf_counter() - start
        bar.update(task, advance=1, description="export to ONNX")
        exported = export_torch(model, specs, [example[s.name] for s in specs], names, opset)
        seconds["export"] = exported.seconds
        bar.update(task, advance=1, description="prepare graph")
        start = time.perf_counter()
        prepared, report = prepare_model(
            exported.model, opset=opset, simplify=s.simplify, label="the exported model"
        )
        seconds["prepare"] = time.perf_counter() - start
        target = Path(out_path) if out_path is not None else default_onnx_path(name)
        with staged_onnx(target) as staged:
            report.external_data = save_onnx(prepared, staged, s.external_threshold)
            del prepared
            bar.update(task, advance=1, description="verify in ONNX Runtime")
            start = time.perf_counter()
            candidate, ort_names = ort_runner(staged)
            result = verify(
                candidate,
                reference,
                ort_names,
                standard_cases(specs, data, s.seed, s.int_high),
                reference_label="PyTorch",
                atol=atol,
                rtol=rtol,
            )
            seconds["verify"] = time.perf_counter() - start
            result.raise_if_failed("the exported ONNX")
            meta = ExportMeta(
                source=label,
                inputs=specs,
                outputs=graph_outputs(load_onnx_header(staged)),
                opset=default_opset(load_onnx_header(staged)),
                sha256=file_sha256(staged),
                exporter=exported.exporter,
                verification=result.to_json(),
                preparation=report.to_json(),
                extra={"fallback_reason": exported.fallback_reason} if exported.fallback_reason else {},
            )
            write_export_meta(meta, staged)
            bar.update(task, advance=1)
    return ExportResult(
        target, meta_path(target), meta, exported.exporter, exported.fallback_reason, result, report, seconds
    )


@dataclass
class PrepareResult:
    onnx_path: Path
    meta_path: Path
    meta: ExportMeta
    preparation: PrepareReport
    verification: VerifyResult | None

    def to_json(self) -> dict[str, Any]:
        return {"onnx": str(self.onnx_path), "sidecar": str(self.meta_path), **self.meta.to_json()}


def prepare_onnx(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    settings: ExportSettings | None = None,
    *,
    inputs: Sequence[InputSpec] | None = None,
    verify_inputs: VerifyData = None,
    **overrides: Any,
) -> PrepareResult:
    """Prepare a third-party ONNX file and check, in ONNX Runtime, that it computes what the original did.

    ``settings`` / ``overrides``: as for :func:`export_model` (export/settings.py).
    ``inputs``: declared input specs (min/opt/max) for the sidecar and the comparison; they must fit the
    graph. Without them the specs come from the graph: ``dim_values`` fixes symbolic dims (e.g.
    {"image_width": 128}); a symbolic axis 0 is the batch (1..``max_batch``); another unnamed symbolic dim
    runs as 64 in the comparison and leaves the sidecar without input specs (later stages then ask)."""
    s = ExportSettings.from_overrides(settings, overrides)
    atol, rtol = s.tolerances(against_torch=False)
    seed, int_high, dim_values = s.seed, s.int_high, s.dim_values
    in_path, out_path = Path(in_path), Path(out_path)
    if out_path.exists() and in_path.resolve() == out_path.resolve():
        raise TrtbuildError("prepare would overwrite its input", "give a different --out path")
    original = load_onnx(in_path)
    prepared, report = prepare_model(original, opset=s.opset, simplify=s.simplify, label=f"'{in_path}'")
    del original
    specs: list[InputSpec] = []
    if inputs:
        specs = list(inputs)
        check_specs_fit_graph(specs, prepared)
        cases = standard_cases(specs, _verify_data(verify_inputs, specs), seed, int_high)
    else:
        with contextlib.suppress(TrtbuildError):  # symbolic non-batch dims: later stages need explicit shapes
            specs = specs_from_graph(prepared, max_batch=s.max_batch, dim_values=dim_values)
        cases = [("random", _feeds_for_graph(prepared, dim_values or {}, seed, int_high))]
        if verify_inputs is not None and specs:
            cases += standard_cases(specs, _verify_data(verify_inputs, specs), seed, int_high)[1:]
    with staged_onnx(out_path) as staged:
        report.external_data = save_onnx(prepared, staged, s.external_threshold)
        del prepared
        header = load_onnx_header(staged)
        result = None
        if s.verify_outputs:
            candidate, names = ort_runner(staged)
            reference, _ = ort_runner(in_path)
            result = verify(
                candidate, reference, names, cases, reference_label="the original ONNX", atol=atol, rtol=rtol
            )
            result.raise_if_failed("the prepared ONNX")
        meta = ExportMeta(
            source=str(in_path),
            inputs=specs,
            outputs=graph_outputs(header),
            opset=default_opset(header),
            sha256=file_sha256(staged),
            exporter="prepare",
            verification=result.to_json() if result else None,
            preparation=report.to_json(),
        )
        write_export_meta(meta, staged)
    return PrepareResult(out_path, meta_path(out_path), meta, report, result)


def check_specs_fit_graph(specs: Sequence[InputSpec], model: Any) -> None:
    """Declared inputs must name the graph inputs and keep its fixed dims (only symbolic dims may vary)."""
    from export.meta import graph_inputs

    graph = {v.name: v for v in graph_inputs(model)}
    if sorted(s.name for s in specs) != sorted(graph):
        raise TrtbuildError(
            f"--input names {[s.name for s in specs]} differ from the model's inputs {list(graph)}",
            "declare one --input per model input, with the model's names",
        )
    for spec in specs:
        graph_dims = graph[spec.name].type.tensor_type.shape.dim
        dims = [fixed_size(d) for d in graph_dims]
        fits = len(dims) == len(spec.opt_shape) and all(
            d is None or lo == hi == d for d, lo, hi in zip(dims, spec.min, spec.max, strict=False)
        )
        if not fits:
            shown = "x".join(
                (d.dim_param or "?") if fixed_size(d) is None else str(d.dim_value) for d in graph_dims
            )
            raise TrtbuildError(
                f"input '{spec.name}' declared {fmt_shape(spec.min)}..{fmt_shape(spec.max)} does not fit the "
                f"model's {shown}",
                "match the model's rank and fixed dims (only its symbolic dims can be dynamic)",
            )


def _feeds_for_graph(
    model: Any, dim_values: Mapping[str, int], seed: int, int_high: int
) -> dict[str, np.ndarray]:
    """Seeded random feeds for a graph's inputs; symbolic dims take ``dim_values`` or 1 for the batch."""
    from export.meta import graph_inputs

    specs = []
    for value in graph_inputs(model):
        dims = value.type.tensor_type.shape.dim
        shape = []
        for axis, d in enumerate(dims):
            if fixed_size(d) is not None:
                shape.append(d.dim_value)
            elif d.dim_param in dim_values:
                shape.append(int(dim_values[d.dim_param]))
            elif axis == 0 or not d.dim_param:
                shape.append(1)
            else:
                shape.append(DEFAULT_SYMBOLIC_DIM)
        dtype = str(np.dtype(onnx_np_dtype(value.type.tensor_type.elem_type)))
        specs.append(InputSpec(value.name, tuple(shape), dtype))
    return random_inputs(specs, seed=seed, int_high=int_high)


DEFAULT_SYMBOLIC_DIM = 64  # e.g. an image width or sequence length with no declared value


def onnx_np_dtype(elem_type: int) -> Any:
    import onnx

    return onnx.helper.tensor_dtype_to_np_dtype(elem_type)


def load_onnx_header(path: str | os.PathLike[str]) -> Any:
    """The graph without weights: enough for names, shapes and opset."""
    import onnx

    return onnx.load(str(path), load_external_data=False)


def _export_onnx_source(
    source: ModelSource,
    inputs: Sequence[InputSpec | str],
    out_path: str | os.PathLike[str] | None,
    settings: ExportSettings,
    verify_inputs: VerifyData,
) -> ExportResult:
    """An existing ONNX file as the source: preparation only, verified against the original in ORT."""
    s = settings
    specs = (
        build_specs(
            inputs,
            dynamic_batch=s.dynamic_batch,
            max_batch=s.max_batch,
            min_shapes=s.min_shapes,
            max_shapes=s.max_shapes,
        )
        if inputs
        else None
    )
    target = Path(out_path) if out_path is not None else default_onnx_path(source.name)
    start = time.perf_counter()
    with progress(transient=True) as bar:
        bar.add_task("prepare and verify ONNX", total=None)
        prepared = prepare_onnx(source.spec, target, s, inputs=specs, verify_inputs=verify_inputs)
    assert prepared.verification is not None
    seconds = {"prepare+verify": time.perf_counter() - start}
    return ExportResult(
        prepared.onnx_path,
        prepared.meta_path,
        prepared.meta,
        "prepare",
        None,
        prepared.verification,
        prepared.preparation,
        seconds,
    )


def _load(source: str | Any, weights: str | os.PathLike[str] | None) -> tuple[Any, str, str]:
    """(model, label for the sidecar, short name for default paths)."""
    if isinstance(source, str):
        parsed: ModelSource = resolve_source(source)
        return load_torch_model(parsed, weights), parsed.spec, parsed.name
    if weights is not None:
        from export.sources import load_weights

        load_weights(source, weights)
    name = type(source).__name__.lower()
    return source.eval(), f"{type(source).__module__}.{type(source).__name__}", name


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def _verify_data(data: VerifyData, specs: Sequence[InputSpec]) -> Mapping[str, np.ndarray] | None:
    if data is None:
        return None
    if isinstance(data, (str, os.PathLike)):
        return load_verify_data(data, specs)
    if isinstance(data, np.ndarray):
        if len(specs) != 1:
            raise TrtbuildError(
                "one verification array was given for a model with several inputs",
                "pass a dict of arrays keyed by input name",
            )
        return {specs[0].name: data}
    return dict(data)


__all__ = [
    "ExportResult",
    "PrepareResult",
    "build_specs",
    "export_model",
    "prepare_onnx",
    "default_onnx_path",
    "specs_from_graph",
]

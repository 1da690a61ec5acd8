"""Does the ONNX graph compute what the source model computes? Run both on the same inputs and compare.

The candidate runs in ONNX Runtime (CPU); the reference is PyTorch (after export) or the original ONNX
(after preparation of a third-party file). Inputs: seeded random ones at the traced shape and, when a dim
is dynamic, at a second shape; plus real data (npy/npz, or arrays from the caller) in batches the graph
accepts. An element fails as in numpy.allclose: |a - b| > atol + rtol * |b|.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trtbuild.core.defaults import EXPORT_ATOL, EXPORT_RTOL
from trtbuild.core.errors import TrtbuildError
from trtbuild.core.inputs import InputSpec, fmt_shape

Feeds = dict[str, np.ndarray]
Runner = Callable[[Feeds], list[np.ndarray]]

DEFAULT_ATOL = EXPORT_ATOL  # vs PyTorch (trtbuild/core/defaults.py)
DEFAULT_RTOL = EXPORT_RTOL
DEFAULT_INT_HIGH = 16  # random integer inputs (token ids, indices) are drawn from [0, int_high)


@dataclass(frozen=True)
class OutputError:
    """Error of one output on one case. ``max_rel`` is over elements whose reference exceeds atol in size
    (relative error of values near zero means nothing)."""

    name: str
    max_abs: float
    max_rel: float
    mismatched: int
    total: int

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "mismatched": self.mismatched,
            "total": self.total,
        }


@dataclass(frozen=True)
class VerifyCase:
    label: str  # "random 1x3x224x224", "data 0:8"
    outputs: list[OutputError]

    @property
    def passed(self) -> bool:
        return all(o.mismatched == 0 for o in self.outputs)


@dataclass(frozen=True)
class VerifyResult:
    reference: str  # "pytorch" or "original onnx"
    atol: float
    rtol: float
    cases: list[VerifyCase]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.cases)

    def worst(self) -> list[OutputError]:
        """Per output, the largest errors over all cases."""
        merged: dict[str, OutputError] = {}
        for case in self.cases:
            for o in case.outputs:
                m = merged.get(o.name)
                merged[o.name] = (
                    o
                    if m is None
                    else OutputError(
                        o.name,
                        max(m.max_abs, o.max_abs),
                        max(m.max_rel, o.max_rel),
                        m.mismatched + o.mismatched,
                        m.total + o.total,
                    )
                )
        return list(merged.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "atol": self.atol,
            "rtol": self.rtol,
            "passed": self.passed,
            "outputs": [o.to_json() for o in self.worst()],
            "cases": [
                {"label": c.label, "passed": c.passed, "outputs": [o.to_json() for o in c.outputs]}
                for c in self.cases
            ],
        }

    def raise_if_failed(self, what: str) -> None:
        if self.passed:
            return
        bad = [o for o in self.worst() if o.mismatched]
        detail = "; ".join(
            f"'{o.name}' max abs {o.max_abs:.3g}, max rel {o.max_rel:.3g}, "
            f"{o.mismatched}/{o.total} elements off"
            for o in bad[:3]
        )
        raise TrtbuildError(
            f"{what} differs from {self.reference} beyond atol={self.atol:g} rtol={self.rtol:g}: {detail}",
            "look for non-deterministic or unsupported ops, or loosen --atol/--rtol if that is expected",
        )


def compare_outputs(
    names: Sequence[str],
    actual: Sequence[np.ndarray],
    expected: Sequence[np.ndarray],
    atol: float,
    rtol: float,
) -> list[OutputError]:
    if len(actual) != len(expected):
        raise TrtbuildError(
            f"the ONNX graph has {len(actual)} outputs but the reference has {len(expected)}",
            "check --output-name and the model's return value",
        )
    errors = []
    for name, a, b in zip(names, actual, expected, strict=False):
        a64 = np.asarray(a, dtype=np.float64)
        b64 = np.asarray(b, dtype=np.float64)
        if a64.shape != b64.shape:
            raise TrtbuildError(
                f"output '{name}' has shape {a64.shape} in ONNX but {b64.shape} in the reference",
                "check the dynamic axes (--dynamic-batch, --min-shape/--max-shape)",
            )
        diff = np.abs(a64 - b64)
        same_nan = np.isnan(a64) & np.isnan(b64)
        diff = np.where(same_nan, 0.0, np.nan_to_num(diff, nan=np.inf))
        bad = diff > atol + rtol * np.abs(np.nan_to_num(b64))
        meaningful = np.abs(b64) > atol
        rel = float(np.max(diff[meaningful] / np.abs(b64[meaningful]))) if meaningful.any() else 0.0
        errors.append(OutputError(name, float(diff.max(initial=0.0)), rel, int(bad.sum()), int(diff.size)))
    return errors


def random_inputs(
    specs: Sequence[InputSpec],
    shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    int_high: int = DEFAULT_INT_HIGH,
) -> Feeds:
    """Seeded random feeds: standard normal floats, integers in [0, int_high), random booleans."""
    rng = np.random.default_rng(seed)
    feeds: Feeds = {}
    for spec in specs:
        shape = tuple(shapes[spec.name]) if shapes and spec.name in shapes else spec.opt_shape
        kind = spec.np_dtype.kind
        if kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.np_dtype)
        elif kind == "b":
            feeds[spec.name] = rng.random(shape) < 0.5
        else:
            feeds[spec.name] = rng.integers(0, int_high, size=shape).astype(spec.np_dtype)
    return feeds


def second_shapes(specs: Sequence[InputSpec]) -> dict[str, tuple[int, ...]] | None:
    """Another valid shape for inputs with dynamic dims (opt x2 within max, else min), or None if static."""
    if not any(s.dynamic_axes for s in specs):
        return None
    shapes = {}
    for spec in specs:
        dims = list(spec.opt_shape)
        for axis in spec.dynamic_axes:
            grown = min(spec.max[axis], max(2 * dims[axis], dims[axis] + 1))
            dims[axis] = grown if grown != dims[axis] else spec.min[axis]
        shapes[spec.name] = tuple(dims)
    return shapes


def load_verify_data(path: str | os.PathLike[str], specs: Sequence[InputSpec]) -> Feeds:
    """Real inputs from `.npy` (a model with one input) or `.npz` (arrays named like the inputs)."""
    path = Path(path)
    if not path.is_file():
        raise TrtbuildError(f"verification data '{path}' does not exist", "check the --verify-data path")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise TrtbuildError(
            f"cannot read verification data '{path}' ({type(exc).__name__})",
            "give a .npy array or a .npz archive saved with numpy",
        ) from exc
    if isinstance(loaded, np.ndarray):
        if len(specs) != 1:
            raise TrtbuildError(
                f"'{path}' holds one array but the model has {len(specs)} inputs",
                "save an .npz with one array per input name",
            )
        return {specs[0].name: loaded}
    with loaded:
        missing = [s.name for s in specs if s.name not in loaded.files]
        if missing:
            raise TrtbuildError(
                f"'{path}' has no array for input(s) {', '.join(missing)}",
                f"name the arrays {', '.join(s.name for s in specs)}",
            )
        return {s.name: loaded[s.name] for s in specs}


def data_batches(specs: Sequence[InputSpec], data: Mapping[str, np.ndarray]) -> Iterable[tuple[str, Feeds]]:
    """Split real data (leading axis = samples) into batches each input's shape range accepts."""
    checked = {s.name: _check_data(s, data) for s in specs}
    count = {len(v) for v in checked.values()}
    if len(count) != 1:
        raise TrtbuildError(
            "verification inputs have different sample counts", "give the same number per input"
        )
    n = count.pop()
    step = min(s.max[0] for s in specs) if specs else 1
    for start in range(0, n, step):
        stop = min(n, start + step)
        batch = {name: arr[start:stop] for name, arr in checked.items()}
        if any(stop - start < s.min[0] for s in specs):
            continue  # a tail smaller than the minimum batch
        yield f"data {start}:{stop}", batch


def _check_data(spec: InputSpec, data: Mapping[str, np.ndarray]) -> np.ndarray:
    if spec.name not in data:
        raise TrtbuildError(
            f"verification data has no array for input '{spec.name}'", f"provide arrays named {spec.name}"
        )
    arr = np.asarray(data[spec.name])
    fits = arr.ndim == len(spec.opt_shape) and all(
        lo <= d <= hi for d, lo, hi in zip(arr.shape[1:], spec.min[1:], spec.max[1:], strict=False)
    )
    if not fits:
        raise TrtbuildError(
            f"verification data for '{spec.name}' has shape {fmt_shape(arr.shape)}, which does not fit "
            f"{fmt_shape(spec.min)}..{fmt_shape(spec.max)}",
            "give samples along axis 0 in the declared shape",
        )
    if arr.dtype != spec.np_dtype:
        if arr.dtype.kind != spec.np_dtype.kind and not (
            arr.dtype.kind in "iu" and spec.np_dtype.kind in "iu"
        ):
            raise TrtbuildError(
                f"verification data for '{spec.name}' is {arr.dtype}, the input is {spec.dtype}",
                f"save it as {spec.dtype}",
            )
        arr = arr.astype(spec.np_dtype)
    return arr


def ort_runner(onnx_path: str | os.PathLike[str]) -> tuple[Runner, list[str]]:
    """An ONNX Runtime CPU session as a runner, and its output names."""
    from trtbuild.core import ort as ort_core

    try:
        session = ort_core.cpu_session(Path(onnx_path))
    except Exception as exc:
        raise TrtbuildError(
            f"ONNX Runtime cannot load '{onnx_path}' ({str(exc).splitlines()[0][:200]})",
            "the graph uses an op or type ONNX Runtime does not support",
        ) from exc
    names = [o.name for o in session.get_outputs()]

    def run(feeds: Feeds) -> list[np.ndarray]:
        try:
            return [np.asarray(x) for x in session.run(names, feeds)]
        except Exception as exc:  # ORT's InvalidArgument/Fail: e.g. Silero VAD's If on a random `sr`
            shown = ", ".join(f"{k} {fmt_shape(v.shape) or 'scalar'} {v.dtype}" for k, v in feeds.items())
            raise TrtbuildError(
                f"ONNX Runtime cannot run '{Path(onnx_path).name}' on the comparison inputs ({shown}): "
                f"{str(exc).strip().splitlines()[0][:240]}",
                "the model takes other sizes or values: give its dims with --dim NAME=VALUE (prepare) or "
                "real inputs, or skip the comparison with --no-verify",
            ) from exc

    return run, names


def torch_runner(model: Any, specs: Sequence[InputSpec]) -> Runner:
    """PyTorch as a runner: feeds in declared input order, outputs flattened (tuples, lists, dicts)."""
    import torch

    def run(feeds: Feeds) -> list[np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(feeds[s.name])) for s in specs]
        with torch.no_grad():
            result = model(*args)
        return [t.detach().cpu().numpy() for t in flatten_outputs(result)]

    return run


def flatten_outputs(result: Any) -> list[Any]:
    """Tensors of a model's return value in the order the ONNX exporters emit them."""
    if isinstance(result, dict):
        return [t for v in result.values() for t in flatten_outputs(v)]
    if isinstance(result, (list, tuple)):
        return [t for v in result for t in flatten_outputs(v)]
    return [result] if result is not None and hasattr(result, "shape") else []


def verify(
    candidate: Runner,
    reference: Runner,
    names: Sequence[str],
    cases: Iterable[tuple[str, Feeds]],
    *,
    reference_label: str,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
) -> VerifyResult:
    results = [
        VerifyCase(label, compare_outputs(names, candidate(feeds), reference(feeds), atol, rtol))
        for label, feeds in cases
    ]
    return VerifyResult(reference_label, atol, rtol, results)


def standard_cases(
    specs: Sequence[InputSpec],
    data: Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
    int_high: int = DEFAULT_INT_HIGH,
) -> list[tuple[str, Feeds]]:
    """Seeded random inputs at the traced shape (and a second shape when dynamic), then the real data."""
    cases = [(f"random {fmt_shape(specs[0].opt_shape)}", random_inputs(specs, seed=seed, int_high=int_high))]
    other = second_shapes(specs)
    if other:
        cases.append(
            (
                f"random {fmt_shape(other[specs[0].name])}",
                random_inputs(specs, other, seed=seed + 1, int_high=int_high),
            )
        )
    if data is not None:
        cases.extend(data_batches(specs, data))
    return cases

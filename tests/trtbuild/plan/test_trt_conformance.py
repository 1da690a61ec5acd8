"""Conformance of trtbuild/trt_backend.py with real TensorRT APIs, without TensorRT installed.

(a) mypy --strict checks the module against `tensorrt-stubs` (the TensorRT 10.13 Python API), so a
    misspelled or missing TensorRT attribute fails. The published stubs cannot be used as installed (no
    py.typed marker, so mypy silently treats `tensorrt` as Any; and the .pyi has syntax errors such as a
    parameter named `in`), so the test copies them, repairs the syntax, and proves they are in force with
    a deliberately wrong attribute.
(b) Every TensorRT name the code path shared with 11.x uses exists in the TensorRT 11.4 bindings
    (`tensorrt-cu13-bindings`, read from its tensorrt.so since it cannot be imported without libnvinfer),
    and the names 11.0 removed are absent there and appear only in the `_legacy_*` functions.
"""

from __future__ import annotations

import ast
import importlib.util
import itertools
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper

from trtbuild import trt_backend
from trtbuild.core.errors import TrtbuildError
from trtbuild.core.trt_versions import has
from trtbuild.plan import make_plan
from trtbuild.targets import PRECISIONS, TARGETS

REPO = Path(__file__).resolve().parents[3]
BACKEND = REPO / "trtbuild" / "trt_backend.py"
TRT11_WHEEL = "tensorrt-cu13-bindings==11.4.0.106"
# Where a pre-fetched wheel may already be (this machine has no TensorRT but has the wheel here).
WHEEL_DIRS = [Path(os.environ.get("TRTBUILD_TRT11_WHEEL_DIR", "/tmp/trt11"))]
REMOVED_IN_11 = {
    "IInt8EntropyCalibrator2",
    "IInt8Calibrator",
    "int8_calibrator",
    "set_calibration_profile",
    "device_memory_size",
    "EXPLICIT_BATCH",
    "set_dynamic_range",
}


# ---- (a) mypy against tensorrt-stubs -----------------------------------------------------------------


def _installed_stubs() -> tuple[Path, Path]:
    spec = importlib.util.find_spec("tensorrt")
    assert spec and spec.submodule_search_locations, (
        "tensorrt-stubs is not installed: pip install --no-deps tensorrt-stubs==10.13.0.35.1"
    )
    trt_dir = Path(next(iter(spec.submodule_search_locations)))
    bindings = trt_dir.parent / "tensorrt_bindings"
    assert (trt_dir / "__init__.pyi").is_file() and (bindings / "tensorrt.pyi").is_file(), (
        "tensorrt-stubs is not installed: pip install --no-deps tensorrt-stubs==10.13.0.35.1"
    )
    return trt_dir, bindings


def _repair_def(line: str) -> str:
    """`def f(self, in: X)` -> `in_`; a parameter without default after one with a default gets `= ...`."""
    line = re.sub(r"(?<=[(, ])in:", "in_:", line)
    match = re.match(r"^(\s*def \w+\()(.*)(\)\s*->.*)$", line)
    if not match:
        return line
    params, seen_default = [], False
    for param in re.split(r",\s*(?![^\[]*\])", match[2]):
        if "=" in param:
            seen_default = True
        elif seen_default and param.strip() and not param.strip().startswith("*"):
            param += " = ..."
        params.append(param)
    return match[1] + ", ".join(params) + match[3]


@pytest.fixture(scope="module")
def stub_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    trt_dir, bindings = _installed_stubs()
    out = tmp_path_factory.mktemp("stubs")
    shutil.copytree(trt_dir, out / "tensorrt", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    shutil.copytree(bindings, out / "tensorrt_bindings", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    (out / "tensorrt_libs").mkdir()
    (out / "tensorrt_libs" / "__init__.pyi").write_text("")  # imported by the stubs, not part of them
    pyi = out / "tensorrt_bindings" / "tensorrt.pyi"
    pyi.write_text(
        "\n".join(
            _repair_def(line) if line.lstrip().startswith("def ") else line
            for line in pyi.read_text().splitlines()
        )
        + "\n"
    )
    return out


def _mypy(stub_dir: Path, tmp: Path, *files: Path) -> subprocess.CompletedProcess[str]:
    config = tmp / "mypy.ini"
    config.write_text(
        "[mypy]\npython_version = 3.11\nstrict = True\nfollow_imports = silent\n"
        "[mypy-tensorrt.*,tensorrt_bindings.*,tensorrt_libs.*]\nignore_errors = True\n"
        "[mypy-cuda.*]\nignore_missing_imports = True\n"
    )
    env = {**os.environ, "MYPYPATH": str(stub_dir)}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(config),
            "--cache-dir",
            str(tmp / "cache"),
            "--no-error-summary",
            *map(str, files),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_backend_type_checks_against_tensorrt_stubs(stub_dir: Path, tmp_path: Path) -> None:
    # Two deliberately broken copies prove the stubs are in force (a silently-Any `tensorrt` passes both).
    source = BACKEND.read_text()
    typo = tmp_path / "backend_typo.py"
    typo.write_text(source.replace("config.set_memory_pool_limit(", "config.set_memory_pool_limt(", 1))
    wrong_enum = tmp_path / "backend_enum.py"
    wrong_enum.write_text(
        source.replace("trt.ProfilingVerbosity.DETAILED", "trt.ProfilingVerbosity.DETALED", 1)
    )
    assert typo.read_text() != source and wrong_enum.read_text() != source
    result = _mypy(stub_dir, tmp_path, BACKEND, typo, wrong_enum)
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert not [e for e in errors if e.startswith("trtbuild")], result.stdout + result.stderr
    assert any("backend_typo.py" in e and "set_memory_pool_limt" in e for e in errors), result.stdout
    assert any("backend_enum.py" in e and "DETALED" in e for e in errors), result.stdout
    assert len(errors) == 2, result.stdout


# ---- (b) the 11.x path against the 11.x bindings -------------------------------------------------------


def _trt11_so(cache: Path) -> bytes:
    wheels = [
        w
        for d in [cache, *WHEEL_DIRS]
        if d.is_dir()
        for w in d.glob("tensorrt_cu13_bindings-11.4.0.106-*.whl")
    ]
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", TRT11_WHEEL, "-d", str(cache)],
            check=True,
            timeout=300,
        )
        wheels = list(cache.glob("tensorrt_cu13_bindings-11.4.0.106-*.whl"))
    assert wheels, f"could not fetch {TRT11_WHEEL}"
    with zipfile.ZipFile(wheels[0]) as wheel:
        return wheel.read(next(n for n in wheel.namelist() if n.endswith("tensorrt.so")))


@pytest.fixture(scope="module")
def trt11(request: pytest.FixtureRequest) -> bytes:
    return _trt11_so(Path(request.config.cache.mkdir("trt11-wheel")))


def exported(so: bytes, name: str) -> bool:
    """pybind11 registers each name as a NUL-terminated C string; the linker may share a name's storage
    with a longer string ending in it ("Logger" inside "ILogger"), so match the terminated suffix."""
    return name.encode() + b"\0" in so


def _root(node: ast.AST) -> str | None:
    while isinstance(node, ast.Attribute | ast.Call | ast.Subscript):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def backend_trt_names() -> dict[str, set[str]]:
    """TensorRT attribute names used by trt_backend.py, split into the `_legacy_*` functions (<= 10.x only)
    and everything else (the path 11.x runs). A variable counts as a TensorRT object when it is a parameter
    annotated `trt.X`, or is assigned from `trt....`, from another TensorRT object, or from a local function
    annotated to return `trt.X`."""
    tree = ast.parse(BACKEND.read_text())
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    returns_trt = {f.name for f in funcs if f.returns is not None and _root(f.returns) == "trt"}
    names: dict[str, set[str]] = {"common": set(), "legacy": set()}
    for func in funcs:
        trt_vars = {"trt"} | {
            a.arg for a in func.args.args if a.annotation is not None and _root(a.annotation) == "trt"
        }
        for _ in range(3):  # assignments may refer to each other in any order: iterate to a fixpoint
            for node in ast.walk(func):
                if (
                    isinstance(node, ast.Assign)
                    and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name)
                ):
                    root = _root(node.value)
                    if root in trt_vars or (root in returns_trt and isinstance(node.value, ast.Call)):
                        trt_vars.add(node.targets[0].id)
        section = "legacy" if func.name.startswith("_legacy_") else "common"
        for node in ast.walk(func):
            if isinstance(node, ast.Attribute) and _root(node) in trt_vars:
                names[section].add(node.attr)
    return names


def test_name_extraction_sees_the_backend() -> None:
    names = backend_trt_names()
    assert {
        "Builder",
        "OnnxParser",
        "build_serialized_network",
        "set_memory_pool_limit",
        "STRONGLY_TYPED",
        "create_timing_cache",
        "serialize",
        "device_memory_size_v2",
        "get_error",
        "desc",
        "WORKSPACE",
        "create_engine_inspector",
        "get_engine_information",
        # the profiling harness's calls (harness/trt_runner.py goes through the backend)
        "deserialize_cuda_engine",
        "create_execution_context",
        "set_input_shape",
        "set_tensor_address",
        "execute_async_v3",
        "get_tensor_profile_shape",
    } <= names["common"]
    assert REMOVED_IN_11 - {"IInt8Calibrator", "set_dynamic_range"} <= names["legacy"]


def test_common_path_names_exist_in_trt11(trt11: bytes) -> None:
    names = backend_trt_names()
    missing = sorted(n for n in names["common"] if not exported(trt11, n))
    assert not missing, f"used on the 11.x path but absent from TensorRT 11.4: {missing}"
    assert not names["common"] & REMOVED_IN_11


def test_removed_names_are_absent_from_trt11(trt11: bytes) -> None:
    for name in REMOVED_IN_11:
        assert not exported(trt11, name), name
    assert exported(trt11, "device_memory_size_v2") and exported(trt11, "STRONGLY_TYPED")  # positive controls


def _builder_flag_docs() -> dict[str, str]:
    """BuilderFlag member -> first line of its 10.13 docstring, from the stubs."""
    _, bindings = _installed_stubs()
    text = (bindings / "tensorrt.pyi").read_text()
    block = text[text.index("class BuilderFlag:") :]
    block = block[: block.index('"""', block.index('"""') + 3)]
    return {m[1]: m[2].strip() for m in re.finditer(r"^\s{6}(\w+) : (.+)$", block, re.M)}


@pytest.fixture(scope="module")
def plans_for_11(tmp_path_factory: pytest.TempPathFactory) -> list:
    """Every valid plan for TensorRT 11.x over targets x precisions x options."""
    root = tmp_path_factory.mktemp("p11")
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 8, 8])
    model = root / "m.onnx"
    onnx.save(
        helper.make_model(
            helper.make_graph([helper.make_node("Relu", ["images"], ["y"])], "g", [x], [y]),
            opset_imports=[helper.make_opsetid("", 17)],
        ),
        str(model),
    )
    fp8 = onnx.load(str(model))  # -p fp8 takes only a graph with FP8 Q/DQ: an E4M3 initializer marks one
    fp8.graph.initializer.append(helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0.0]))
    fp8_model = root / "m.fp8.onnx"
    onnx.save(fp8, str(fp8_model))
    plans = []
    options = itertools.product(
        PRECISIONS, (None, "ampere_plus", "same_compute_capability"), (False, True), (False, True)
    )
    for target_id, (prec, hw, vc, sparse) in itertools.product(
        [t for t, v in TARGETS.items() if not v.trt_versions], options
    ):
        extra: dict[str, Any] = (
            {"qdq_onnx": fp8_model if prec == "fp8" else model}
            if prec in ("int8", "fp8")
            else {"fp16_onnx": model}
            if prec == "fp16"
            else {}
        )
        try:
            plans.append(
                make_plan(
                    model,
                    target_id,
                    prec,
                    trt_version="11.4",
                    hardware_compat=hw,
                    version_compat=vc,
                    sparsity=sparse,
                    **extra,
                )
            )
        except TrtbuildError:
            continue
    return plans


def test_trt11_plans_use_only_flags_that_exist_in_11(trt11: bytes, plans_for_11: list) -> None:
    docs = _builder_flag_docs()
    assert len(plans_for_11) > 50
    used = {f for p in plans_for_11 for f in p.builder_flags}
    assert used == {"VERSION_COMPATIBLE", "SPARSE_WEIGHTS"}
    for flag in used:  # present in 11.x: the member name and its 10.13 docstring are in the binary
        assert exported(trt11, flag) and docs[flag].encode() in trt11, flag
    for flag in trt_backend.LEGACY_PRECISION_FLAGS:  # removed in 11.0: their docstrings are gone
        assert docs[flag].startswith("Enable") and docs[flag].encode() not in trt11, flag
    for p in plans_for_11:  # so build_engine never reaches a `_legacy_*` function for these plans
        assert p.strongly_typed and p.calib_cache is None
        assert not set(p.builder_flags) & trt_backend.LEGACY_PRECISION_FLAGS
        assert not has("explicit_batch_flag", p.version) and has("device_memory_size_v2", p.version)
        assert p.hardware_compat is None or exported(trt11, p.hardware_compat)


def test_dla_names_exist_in_trt11(trt11: bytes) -> None:
    assert (
        exported(trt11, "GPU_FALLBACK")
        and exported(trt11, "DLA_core")
        and exported(trt11, "default_device_type")
    )


def test_version_table_knows_the_real_bindings(trt11: bytes) -> None:
    """The 11.x wheel we check against is a release the version table accepts, and the parser-error name the
    10.x/11.x path uses (ParserError.node_name, Python bindings 9.1+) is in it."""
    from trtbuild.core.trt_versions import known_version

    assert str(known_version(TRT11_WHEEL.split("==")[1])) == "11.4"
    assert exported(trt11, "node_name") and has("parser_error_node_name", "11.4")
    stubs = (_installed_stubs()[1] / "tensorrt.pyi").read_text()
    assert "def node_name(self" in stubs and has("parser_error_node_name", "10.13")  # the 10.13 API
    assert not has("parser_error_node_name", "8.6.2")  # 8.6's ParserError has node() only


def test_only_the_backend_imports_tensorrt() -> None:
    """Every TensorRT call is in trt_backend.py, where the two checks above see it."""
    offenders = []
    for pkg in ("trtbuild", "calibrators", "export"):
        for path in (REPO / pkg).rglob("*.py"):
            if path == BACKEND:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import) and any(
                    a.name.split(".")[0] == "tensorrt" for a in node.names
                ):
                    offenders.append(str(path.relative_to(REPO)))
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "tensorrt":
                    offenders.append(str(path.relative_to(REPO)))
    assert not offenders, offenders


def test_fp8_names_exist_in_trt11(trt11: bytes, plans_for_11: list) -> None:
    """An FP8 plan is a strongly typed build of a Q/DQ graph whose float8e4m3fn tensors TensorRT types as
    DataType.FP8 (calibrators/fp8.py, docs/fp8.md): that member, with the E4M3 layout the graph uses, is in
    the 10.13 stubs and in the 11.4 bindings; the FP8 builder flag is gone in 11 and FP8 plans never use
    it."""
    _, bindings = _installed_stubs()
    text = (bindings / "tensorrt.pyi").read_text()
    block = text[text.index("class DataType:") :]
    block = block[: block.index('"""', block.index('"""') + 3)]
    doc = re.search(
        r"FP8 :\s+(Signed 8-bit floating point with 1 sign bit, 4 exponent bits, 3 mantissa)", block
    )
    assert doc, "DataType.FP8 (E4M3) is missing from the 10.13 stubs"
    assert exported(trt11, "FP8") and doc[1].encode() in trt11  # the member and its docstring survive in 11
    assert "FP8" in trt_backend.LEGACY_PRECISION_FLAGS  # the flag: 10.x only (checked absent above)
    fp8_plans = [p for p in plans_for_11 if p.precision == "fp8"]
    fp8_targets = {t for t, v in TARGETS.items() if "fp8" in v.precisions and not v.trt_versions}
    assert fp8_targets and {p.target for p in fp8_plans} == fp8_targets  # H100, L4, L40S
    assert all(p.strongly_typed and "FP8" not in p.builder_flags for p in fp8_plans)

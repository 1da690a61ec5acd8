"""BuildPlan decisions for every target x precision x TensorRT version rule, options, refusals, JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper

from trtbuild.core.errors import TrtbuildError
from trtbuild.core.inputs import InputSpec, parse_profile_spec
from trtbuild.core.trt_versions import TrtVersion
from trtbuild.plan import BuildPlan, make_plan
from trtbuild.targets import PRECISIONS, TARGETS
from trtbuild.trtexec import render

DATACENTER_VERSIONS = ("8.6", "10.3", "10.13", "11.4")
SOURCES = ("plain", "qdq", "calib", "fp16_graph")


def _versions(target_id: str) -> tuple[str, ...]:
    t = TARGETS[target_id]
    return t.trt_versions or DATACENTER_VERSIONS


CASES = [
    (t, p, v, s)
    for t in sorted(TARGETS)
    for v in _versions(t)
    for p in PRECISIONS
    for s in SOURCES
    if (s == "qdq" and p in ("int8", "fp8", "int4-weights"))
    or (s == "calib" and p == "int8")
    or (s == "fp16_graph" and p == "fp16")
    or s == "plain"
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small conv net with a dynamic batch (plans only read its inputs), plus stand-in side files; the
    plan checks that they exist but does not parse them (no engine is built in this module)."""
    root = tmp_path_factory.mktemp("plan")
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 16, 16])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4, 14, 14])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], [0.1] * 108)
    graph = helper.make_graph([helper.make_node("Conv", ["images", "w"], ["logits"])], "g", [x], [y], [w])
    model = root / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    out = {
        "model": model,
        "qdq": root / "tiny.int8.qdq.onnx",
        "calib": root / "tiny.calib.cache",
        "fp16_graph": root / "tiny.fp16.onnx",
    }
    for key in ("qdq", "fp16_graph"):
        out[key].write_bytes(model.read_bytes())
    # -p fp8 takes only a graph with FP8 Q/DQ (an E4M3 initializer is what the plan looks for)
    fp8 = onnx.load(str(model))
    fp8.graph.initializer.append(helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0.0]))
    out["qdq_fp8"] = root / "tiny.fp8.onnx"
    onnx.save(fp8, str(out["qdq_fp8"]))
    out["calib"].write_text("TRT-8502-EntropyCalibration2\nimages: 3c008912\n")
    return out


def cache_header(version: str) -> str:
    """TensorRT's getInferLibVersion() as a cache header: major*1000+minor*100+patch before 10.0, then
    major*10000+minor*100+patch (NvInferVersion.h), written out here independently of calibrators.cache."""
    parts = [int(p) for p in version.split(".")] + [0]
    major, minor, patch = parts[0], parts[1], parts[2]
    tag = major * (10000 if major >= 10 else 1000) + minor * 100 + patch
    return f"TRT-{tag}-EntropyCalibration2"


def cache_for(files: dict[str, Path], version: str, *, with_input: bool = True) -> Path:
    """A calibration cache carrying ``version``'s header (what a plan for that version must be given)."""
    path = files["model"].parent / f"tiny.trt{version}.{'in' if with_input else 'noin'}.calib.cache"
    body = "images: 3c008912\n" if with_input else ""
    path.write_text(f"{cache_header(version)}\n{body}")
    return path


def expected(target_id: str, prec: str, ver: str, source: str) -> tuple[str, ...] | str:
    """The oracle, from docs/tensorrt-versions.md: (onnx kind, strongly typed, flags...) or an error."""
    t, v = TARGETS[target_id], TrtVersion.parse(ver)
    if prec not in t.precisions:
        return "cannot run"
    if prec == "bf16" and v < TrtVersion(9, 0):
        return "BF16 needs TensorRT 9.0+"
    if prec == "fp8" and v < TrtVersion(10, 0):
        return "FP8 needs TensorRT 10.0+"
    if prec == "int4-weights":  # the stand-in Q/DQ file has no INT4 weights: refused as not an INT4 graph
        return "INT4 weight-only needs TensorRT 10.0+" if v < TrtVersion(10, 0) else "INT4 weight-only graph"
    typed_only = v.major >= 11
    if prec == "fp32":
        return ("fp32", str(typed_only))
    if (
        prec == "fp16" and source == "fp16_graph"
    ):  # graphs that carry their precision: strongly typed from 10.0
        return ("fp16", "True") if v.major >= 10 else ("fp16", "False", "FP16")
    if prec == "fp16":
        return "strongly typed only" if typed_only else ("fp32", "False", "FP16")
    if prec == "bf16":
        return "BF16-typed graph" if typed_only else ("fp32", "False", "BF16")
    flag = prec.upper()
    if source == "qdq":
        return ("qdq", "True") if v.major >= 10 else ("qdq", "False", flag, "FP16")
    if prec == "fp8":
        return "FP8 Q/DQ graph"
    if source == "calib":
        return "removed calibrators" if typed_only else ("fp32", "False", "INT8", "FP16")
    return "needs a Q/DQ graph or a calibration cache"


@pytest.mark.parametrize(("target_id", "prec", "ver", "source"), CASES)
def test_plan_matrix(files: dict[str, Path], target_id: str, prec: str, ver: str, source: str) -> None:
    kwargs: dict[str, Any] = {
        "qdq": {"qdq_onnx": files["qdq_fp8" if prec == "fp8" else "qdq"]},
        "calib": {"calib_cache": cache_for(files, ver)},
        "fp16_graph": {"fp16_onnx": files["fp16_graph"]},
        "plain": {},
    }[source]
    want = expected(target_id, prec, ver, source)
    trt_version = None if len(TARGETS[target_id].trt_versions) == 1 else ver  # a JetPack's own by default
    if isinstance(want, str):
        with pytest.raises(TrtbuildError, match=want.replace("+", r"\+")) as info:
            make_plan(files["model"], target_id, prec, trt_version=trt_version, **kwargs)
        assert "\n" not in info.value.one_line()
        return
    plan = make_plan(
        files["model"], target_id, prec, trt_version=trt_version, out_root=files["model"].parent, **kwargs
    )
    v = plan.version
    assert (plan.onnx_kind, str(plan.strongly_typed), *plan.builder_flags) == want
    graph = files[source] if source in ("qdq", "fp16_graph") else files["model"]
    graph = files["qdq_fp8"] if source == "qdq" and prec == "fp8" else graph
    if source == "qdq" and plan.strongly_typed:  # every tensor's type comes from the graph: FP16 float parts
        graph = graph.with_name(graph.name.removesuffix(".onnx") + ".fp16.onnx")
    assert plan.onnx == str(graph)
    if source == "calib":  # the cache the plan passes carries the plan's version (docs/tensorrt-versions.md)
        assert Path(str(plan.calib_cache)).read_text().splitlines()[0] == cache_header(plan.trt_version)
    assert (plan.calib_cache is not None) == (source == "calib")
    assert plan.opt_level == (None if v < TrtVersion(8, 6) else 3)
    assert plan.workspace_mib == TARGETS[target_id].workspace_mib
    assert plan.inputs == (InputSpec("images", (1, 3, 16, 16), "float32", (1, 3, 16, 16), (32, 3, 16, 16)),)
    if v.major >= 11:  # the 11.x path never uses what 11.0 removed
        assert plan.strongly_typed and plan.calib_cache is None
        assert not {"FP16", "INT8", "BF16", "FP8"} & set(plan.builder_flags)
    assert BuildPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    argv = render(plan)  # raises if a flag does not exist in this trtexec version
    assert f"--onnx={plan.onnx}" in argv


def test_fp8_plan_of_a_graph_without_fp8_qdq_is_refused(files: dict[str, Path]) -> None:
    # an INT8 (or INT4) graph given to -p fp8 was planned, strongly typed, as if it were FP8
    with pytest.raises(TrtbuildError, match="has no FP8 Q/DQ") as info:
        make_plan(files["model"], "h100", "fp8", qdq_onnx=files["qdq"])
    assert "\n" not in info.value.one_line()


def test_matrix_covers_every_rule() -> None:
    outcomes = {expected(*case) if isinstance(expected(*case), str) else "ok" for case in CASES}
    assert {
        "ok",
        "cannot run",
        "BF16 needs TensorRT 9.0+",
        "FP8 needs TensorRT 10.0+",
        "strongly typed only",
        "BF16-typed graph",
        "FP8 Q/DQ graph",
        "removed calibrators",
        "needs a Q/DQ graph or a calibration cache",
    } <= outcomes
    assert len(CASES) > 150


def test_options(files: dict[str, Path]) -> None:
    m = files["model"]
    p = make_plan(
        m,
        "h100",
        "fp16",
        trt_version="10.13",
        hardware_compat="same_compute_capability",
        version_compat=True,
        sparsity=True,
        opt_level=5,
        workspace_mib=512,
        out_root=m.parent,
    )
    assert p.hardware_compat == "SAME_COMPUTE_CAPABILITY" and p.opt_level == 5 and p.workspace_mib == 512
    assert set(p.builder_flags) == {"FP16", "VERSION_COMPATIBLE", "SPARSE_WEIGHTS"}
    assert (
        make_plan(m, "a100", "fp32", trt_version="8.6", hardware_compat="ampere_plus").hardware_compat
        == "AMPERE_PLUS"
    )
    dla = make_plan(m, "orin-jp6.2", "int8", calib_cache=cache_for(files, "10.3"), dla_core=1)
    assert dla.dla_core == 1 and dla.gpu_fallback and "GPU_FALLBACK" in dla.builder_flags
    strict = make_plan(m, "xavier-jp5", "fp16", dla_core=0, gpu_fallback=False)
    assert not strict.gpu_fallback and "GPU_FALLBACK" not in strict.builder_flags
    shaped = make_plan(
        m,
        "h100",
        "fp32",
        shapes=[InputSpec("images", (4, 3, 16, 16), "float32", (2, 3, 16, 16), (8, 3, 16, 16))],
    )
    assert shaped.inputs[0].min == (2, 3, 16, 16) and shaped.inputs[0].max == (8, 3, 16, 16)
    assert "timing" in shaped.timing_cache and shaped.engine.endswith("h100-fp32-trt10.13.engine")


@pytest.mark.parametrize(
    ("target_id", "kwargs", "reason"),
    [
        ("thor", {"dla_core": 0, "precision": "fp16"}, "has no DLA"),
        ("a100", {"dla_core": 0, "precision": "fp16"}, "has no DLA"),
        ("xavier-jp5", {"dla_core": 2, "precision": "fp16"}, "DLA cores 0..1"),
        ("orin-jp6.2", {"dla_core": 0, "precision": "fp32"}, "DLA runs only FP16 or INT8"),
        ("xavier-jp5", {"opt_level": 3, "precision": "fp16"}, "optimization level needs TensorRT 8.6"),
        ("h100", {"opt_level": 7, "precision": "fp16"}, "must be 0..5"),
        ("orin-jp6.2", {"hardware_compat": "ampere_plus", "precision": "fp16"}, "Jetson"),
        (
            "h100",
            {"hardware_compat": "same_compute_capability", "trt_version": "10.3", "precision": "fp16"},
            "10.9",
        ),
        ("xavier-jp5", {"sparsity": True, "precision": "fp16"}, "structured-sparsity"),
        ("xavier-jp5", {"version_compat": True, "precision": "fp16"}, "8.6"),
        ("h100", {"workspace_mib": 0, "precision": "fp16"}, "workspace must be positive"),
        ("h100", {"precision": "int4"}, "unknown precision"),
        ("h100", {"precision": "fp16", "trt_version": "9.2"}, "not a release trtbuild knows"),
        ("h100", {"precision": "fp16", "trt_version": "8.5"}, "not supported"),
        # TensorRT 10.7 was the last 10.x with DLA: Orin on JetPack 7.2 (10.16) has the cores but no DLA.
        ("orin-jp7", {"dla_core": 0, "precision": "fp16"}, "TensorRT 10.16 has no DLA support"),
        ("orin-jp7", {"trt_version": "10.13", "precision": "fp16"}, "ships TensorRT 10.16, not 10.13"),
        ("h100", {"precision": "fp16", "shapes": [InputSpec("x", (1, 3, 16, 16))]}, "model's inputs"),
    ],
)
def test_refusals(files: dict[str, Path], target_id: str, kwargs: dict[str, object], reason: str) -> None:
    kw = dict(kwargs)
    prec = str(kw.pop("precision"))
    with pytest.raises(TrtbuildError, match=reason):
        make_plan(files["model"], target_id, prec, **kw)  # type: ignore[arg-type]


def test_plan_load_rejects_other_json(tmp_path: Path) -> None:
    bad = tmp_path / "x.plan.json"
    bad.write_text(json.dumps({"format": 99}))
    with pytest.raises(TrtbuildError, match="not a trtbuild build plan"):
        BuildPlan.load(bad)


def test_plan_load_rejects_an_impossible_version(files: dict[str, Path], tmp_path: Path) -> None:
    plan = make_plan(files["model"], "h100", "fp16", out_root=tmp_path)
    data = plan.to_json() | {"trt_version": "10.100"}  # would render as a TensorRT that does not exist
    path = tmp_path / "edited.plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TrtbuildError, match="TensorRT 10.100 is not a release"):
        BuildPlan.load(path)


@pytest.mark.parametrize(
    ("target_id", "trt_version", "cache_version"),
    [
        ("orin-jp6.1", None, "10.13"),
        ("h100", "10.3", "10.13"),
        ("xavier-jp5", None, "8.6"),
        ("h100", "10.13.3", "10.13"),
    ],
)
def test_cache_for_another_version_is_refused(
    files: dict[str, Path], target_id: str, trt_version: str | None, cache_version: str
) -> None:
    """TensorRT skips a cache whose header it finds incompatible and calibrates on random data instead."""
    with pytest.raises(
        TrtbuildError, match=f"has header {cache_header(cache_version)}, but the plan"
    ) as info:
        make_plan(
            files["model"],
            target_id,
            "int8",
            trt_version=trt_version,
            calib_cache=cache_for(files, cache_version),
        )
    assert "--trt-version" in info.value.one_line()


def test_cache_without_input_scales_is_flagged(files: dict[str, Path]) -> None:
    plain = make_plan(files["model"], "orin-jp6.1", "int8", calib_cache=cache_for(files, "10.3"))
    assert not any("Missing scale" in n for n in plain.notes)
    bare = make_plan(
        files["model"], "orin-jp6.1", "int8", calib_cache=cache_for(files, "10.3", with_input=False)
    )
    assert any("no scale for input(s) images" in n for n in bare.notes)


DLA_HARDWARE = {"xavier-jp5", "orin-jp6.0", "orin-jp6.1", "orin-jp6.2", "orin-jp7"}  # Xavier and Orin only


@pytest.mark.parametrize(
    ("target_id", "ver"),
    [(t, v) for t in sorted(TARGETS) if TARGETS[t].kind == "jetson" for v in _versions(t)],
)
def test_dla_matrix(files: dict[str, Path], target_id: str, ver: str) -> None:
    """DLA needs the hardware and a TensorRT with DLA: up to 10.7, and again from 11.4.1."""
    v = TrtVersion.parse(ver)
    usable = target_id in DLA_HARDWARE and (v < TrtVersion(10, 8) or v >= TrtVersion(11, 4, 1))
    if usable:
        assert make_plan(files["model"], target_id, "fp16", trt_version=ver, dla_core=0).dla_core == 0
    else:
        with pytest.raises(TrtbuildError, match="no DLA"):
            make_plan(files["model"], target_id, "fp16", trt_version=ver, dla_core=0)


def test_shape_option_keeps_the_graph_input_dtype(tmp_path: Path) -> None:
    # --shape carries no dtype: an int64 input_ids read as float32, and the FP16 check of a BERT plan fed
    # float tensors to it (ORT's "Unexpected input data type" traceback)
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    out = helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", "seq", 4])
    table = helper.make_tensor("table", TensorProto.FLOAT, [10, 4], [0.5] * 40)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["h"])], "g", [ids], [out], [table]
    )
    model = tmp_path / "ids.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    shapes = [parse_profile_spec("input_ids:1x8,4x16,8x32")]
    plan = make_plan(model, "h100", "fp32", shapes=shapes, out_root=tmp_path)
    assert [(i.name, i.dtype) for i in plan.inputs] == [("input_ids", "int64")]

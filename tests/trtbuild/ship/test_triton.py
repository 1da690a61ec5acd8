"""Triton model repositories, checked with Triton's own config schema (`model_config.proto` as shipped in
tritonclient) and against the ONNX graphs. No Triton server runs here: the ORT-CPU repository's model is run
in ONNX Runtime with the config's shapes and the warmup file instead, and build.sh runs a stand-in trtexec
that records its arguments (the script's own logic, never a TensorRT result).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cli_helpers import run_cli

from calibrators.cache import read_cache_with_header
from calibrators.calibrate import calibrate
from calibrators.preprocess import Preprocess
from calibrators.ranges import RangeSet
from trtbuild import examples
from trtbuild.bundle import generate_keypair, load_private_key, load_public_key, verify_bundle
from trtbuild.ship.triton import TritonRepository, export_triton


def _model_config_pb2() -> ModuleType:
    """Triton's model_config_pb2, loaded from tritonclient without its grpc extra (protobuf only)."""
    tritonclient = pytest.importorskip("tritonclient")
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pb2() -> ModuleType:
    return _model_config_pb2()


def parse_config(pb2: ModuleType, path: Path) -> Any:
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(encoding="utf-8"), pb2.ModelConfig())


def graph_io(path: Path) -> tuple[dict[str, list[Any]], dict[str, list[Any]], dict[str, str]]:
    """(inputs, outputs) as {name: dims (int or None)} and {name: numpy dtype}, read with onnx directly."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}

    def dims(v: onnx.ValueInfoProto) -> list[Any]:
        return [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]

    types = {
        v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
        for v in [*model.graph.input, *model.graph.output]
    }
    ins = {v.name: dims(v) for v in model.graph.input if v.name not in inits}
    return ins, {v.name: dims(v) for v in model.graph.output}, types


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return examples.write_photo_folder(tmp_path_factory.mktemp("photos") / "p", 2, size=256, seed=5)


@pytest.fixture(scope="module")
def h100_fp16(
    tmp_path_factory: pytest.TempPathFactory, effnet_onnx: Path, photo_dir: Path
) -> TritonRepository:
    return export_triton(
        effnet_onnx,
        "h100",
        "fp16",
        tmp_path_factory.mktemp("repo"),
        warmup_data=photo_dir,
        gpus=[0, 1],
        instances=2,
        labels=[f"class{i}" for i in range(1000)],
    )


def test_tensorrt_config_round_trips_through_tritons_schema(
    pb2: ModuleType, h100_fp16: TritonRepository, effnet_onnx: Path
) -> None:
    cfg = parse_config(pb2, h100_fp16.config_path)
    ins, outs, types = graph_io(effnet_onnx)
    assert cfg.name == "efficientnet_lite0" == h100_fp16.model_dir.name
    assert cfg.platform == "tensorrt_plan"
    plan = json.loads((h100_fp16.model_dir / "trtbuild" / "plan.json").read_text())
    profile_max = plan["inputs"][0]["max"][0]
    assert cfg.max_batch_size == profile_max == 32
    assert [i.name for i in cfg.input] == list(ins) and [o.name for o in cfg.output] == list(outs)
    for tensor, graph in ((cfg.input[0], ins), (cfg.output[0], outs)):
        assert list(tensor.dims) == graph[tensor.name][1:]  # batch dim left to max_batch_size
        assert pb2.DataType.Name(tensor.data_type) == "TYPE_" + {"float32": "FP32"}[types[tensor.name]]
    assert cfg.output[0].label_filename == "labels.txt"
    labels = (h100_fp16.model_dir / "labels.txt").read_text().splitlines()
    assert len(labels) == cfg.output[0].dims[0] == 1000
    assert cfg.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert list(cfg.dynamic_batching.preferred_batch_size) == [32]
    group = cfg.instance_group[0]
    assert pb2.ModelInstanceGroup.Kind.Name(group.kind) == "KIND_GPU"
    assert group.count == 2 and list(group.gpus) == [0, 1]


def test_warmup_replays_the_recorded_photo(
    pb2: ModuleType, h100_fp16: TritonRepository, photo_dir: Path
) -> None:
    cfg = parse_config(pb2, h100_fp16.config_path)
    (warm,) = cfg.model_warmup
    entry = warm.inputs["images"]
    assert warm.batch_size == 1 and list(entry.dims) == [3, 224, 224]
    raw = (h100_fp16.model_dir / "warmup" / entry.input_data_file).read_bytes()
    got = np.frombuffer(raw, np.float32).reshape(1, 3, 224, 224)
    photos = sorted(photo_dir.iterdir())
    expected = [Preprocess(crop=224).apply(p) for p in photos]
    assert any(np.array_equal(got, e) for e in expected)


def test_build_script_writes_the_version_folder_engine(tmp_path: Path, h100_fp16: TritonRepository) -> None:
    assert h100_fp16.build_script is not None
    fake = tmp_path / "trtexec"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$(dirname "$0")/args"\n')
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "TRTEXEC": str(fake)}
    ok = subprocess.run(
        ["bash", str(h100_fp16.build_script)],
        capture_output=True,
        text=True,
        env=env | {"TRT_VERSION": "10.13.2"},
    )
    assert ok.returncode == 0, ok.stderr
    args = (tmp_path / "args").read_text().split()
    assert "--saveEngine=1/model.plan" in args and "--fp16" in args
    assert "--maxShapes=images:32x3x224x224" in args
    onnx_arg = next(a for a in args if a.startswith("--onnx="))
    assert (h100_fp16.model_dir / onnx_arg.split("=", 1)[1]).is_file()
    (tmp_path / "args").unlink()
    bad = subprocess.run(
        ["bash", str(h100_fp16.build_script)],
        capture_output=True,
        text=True,
        env=env | {"TRT_VERSION": "10.3"},
    )
    assert bad.returncode == 2 and "plan is for TensorRT 10.13" in bad.stderr
    assert not (tmp_path / "args").exists()


def test_implicit_int8_carries_the_cache_for_the_plans_tensorrt(
    pb2: ModuleType, tmp_path: Path, effnet_onnx: Path, photo_batch: np.ndarray
) -> None:
    ranges: RangeSet = calibrate(effnet_onnx, photo_batch[:4], "minmax", show_progress=False)
    repo = export_triton(
        effnet_onnx, "a100", "int8", tmp_path, ranges=ranges, trt_version="8.6.1", max_batch=8
    )
    assert repo.plan is not None and repo.plan.calib_cache is not None
    header, scales = read_cache_with_header(repo.model_dir / repo.plan.calib_cache)
    assert header == "TRT-8601-EntropyCalibration2" and set(scales) == set(ranges)
    cfg = parse_config(pb2, repo.config_path)
    assert cfg.max_batch_size == 8 and list(cfg.dynamic_batching.preferred_batch_size) == [8]
    assert repo.requires() == {
        "kind": "datacenter",
        "serving": "triton",
        "tensorrt": "8.6.1",
        "sm": "sm80",
        "device": "NVIDIA A100",
    }


def test_ort_cpu_int8_repository_runs_with_the_configs_shapes(
    pb2: ModuleType, tmp_path: Path, effnet_onnx: Path, effnet_int8_onnx: Path, photo_dir: Path
) -> None:
    repo = export_triton(
        effnet_onnx,
        "ort-cpu",
        "int8",
        tmp_path,
        qdq_onnx=effnet_int8_onnx,
        warmup_data=photo_dir,
        max_batch=4,
    )
    cfg = parse_config(pb2, repo.config_path)
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 4
    assert pb2.ModelInstanceGroup.Kind.Name(cfg.instance_group[0].kind) == "KIND_CPU"
    assert sorted(
        p.relative_to(repo.model_dir).as_posix() for p in repo.model_dir.rglob("*") if p.is_file()
    ) == [
        "1/model.onnx",
        "config.pbtxt",
        "warmup/input0.bin",
    ]
    assert (repo.model_dir / "1" / "model.onnx").read_bytes() == effnet_int8_onnx.read_bytes()
    # What Triton's ONNX Runtime backend would do with the warmup request and a full batch:
    session = ort.InferenceSession(
        str(repo.model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    entry = cfg.model_warmup[0].inputs["images"]
    sample = np.fromfile(repo.model_dir / "warmup" / entry.input_data_file, np.float32)
    batch = np.repeat(sample.reshape(1, *entry.dims), cfg.max_batch_size, axis=0)
    (logits,) = session.run(None, {cfg.input[0].name: batch})
    assert logits.shape == (cfg.max_batch_size, *cfg.output[0].dims)


def test_two_input_transformer(pb2: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> None:
    from test_quantize_models import build_minilm_onnx

    from trtbuild.core.inputs import InputSpec

    folder = tmp_path_factory.mktemp("minilm")
    path, samples = build_minilm_onnx(folder)
    np.savez(folder / "tokens.npz", **samples[0])
    shapes = [InputSpec(n, (4, 24), "int64", (1, 8), (16, 64)) for n in ("input_ids", "attention_mask")]
    ins, outs, types = graph_io(path)
    for trt, want in (("10.13", "TYPE_INT64"), ("8.6", "TYPE_INT32")):  # TensorRT 8 binds INT64 as INT32
        repo = export_triton(
            path,
            "l4",
            "fp16",
            folder / trt,
            shapes=shapes,
            trt_version=trt,
            warmup_data=folder / "tokens.npz",
        )
        cfg = parse_config(pb2, repo.config_path)
        assert cfg.max_batch_size == 16 and list(cfg.dynamic_batching.preferred_batch_size) == [4, 16]
        assert [i.name for i in cfg.input] == list(ins) == ["input_ids", "attention_mask"]
        assert all(list(i.dims) == [-1] for i in cfg.input)  # the sequence axis is dynamic
        assert {pb2.DataType.Name(i.data_type) for i in cfg.input} == {want}
        graph_dims = [-1 if d is None else d for d in outs["embedding"][1:]]  # symbolic in the graph
        assert [(o.name, list(o.dims)) for o in cfg.output] == [("embedding", graph_dims)]
        assert types["embedding"] == "float32" and pb2.DataType.Name(cfg.output[0].data_type) == "TYPE_FP32"
        warm = cfg.model_warmup[0].inputs
        raw = (repo.model_dir / "warmup" / warm["input_ids"].input_data_file).read_bytes()
        np_type = np.int64 if want == "TYPE_INT64" else np.int32
        assert np.array_equal(np.frombuffer(raw, np_type), samples[0]["input_ids"].ravel())


@pytest.fixture(scope="module")
def static_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A fixed-batch model and a batched model whose output has no batch axis."""
    import torch

    folder = tmp_path_factory.mktemp("static")

    class Net(torch.nn.Module):
        def __init__(self, pool_batch: bool) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.pool_batch = pool_batch

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x).mean((2, 3))
            return y.mean(0) if self.pool_batch else y

    fixed, pooled = folder / "fixed.onnx", folder / "pooled.onnx"
    torch.onnx.export(Net(False), (torch.zeros(1, 3, 16, 16),), str(fixed), input_names=["x"], dynamo=False)
    torch.onnx.export(
        Net(True),
        (torch.zeros(2, 3, 16, 16),),
        str(pooled),
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}},
        dynamo=False,
    )
    return fixed, pooled


def test_static_model_gets_max_batch_size_zero(
    pb2: ModuleType, tmp_path: Path, static_onnx: tuple[Path, Path]
) -> None:
    repo = export_triton(static_onnx[0], "h100", "fp32", tmp_path)
    cfg = parse_config(pb2, repo.config_path)
    assert cfg.max_batch_size == 0 and list(cfg.input[0].dims) == [1, 3, 16, 16]
    assert cfg.WhichOneof("scheduling_choice") is None


@pytest.mark.parametrize(
    ("case", "args", "message"),
    [
        (
            "max batch above the plan",
            ["--target", "h100", "--precision", "fp16", "--max-batch", "64"],
            "outside the plan's profile",
        ),
        ("jetson target", ["--target", "orin-jp6.2", "--precision", "fp16"], "is a Jetson"),
        ("precision the target lacks", ["--target", "a100", "--precision", "fp8"], "cannot run FP8"),
        (
            "bad model name",
            ["--target", "h100", "--precision", "fp16", "--name", "my model"],
            "cannot be a Triton model name",
        ),
        (
            "profile without batch 1",
            [
                "--target",
                "h100",
                "--precision",
                "fp16",
                "--shape",
                "images:2x3x224x224,4x3x224x224,8x3x224x224",
            ],
            "smallest batch is 2",
        ),
        (
            "preferred above max",
            ["--target", "h100", "--precision", "fp16", "--max-batch", "8", "--preferred-batch", "4,16"],
            "outside 1..8",
        ),
        (
            "gpus on cpu",
            ["--target", "ort-cpu", "--precision", "fp32", "--gpus", "0"],
            "--gpus applies to GPU targets",
        ),
    ],
)
def test_refusals_are_one_line_exit_2_and_write_nothing(
    tmp_path: Path,
    effnet_onnx: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    args: list[str],
    message: str,
) -> None:
    code, _, err = run_cli(
        ["export-triton", str(effnet_onnx), "--out", str(tmp_path / "repo"), *args], capsys
    )
    assert code == 2, case
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []  # not even the repository folder


def test_batching_refusals_for_models_triton_cannot_batch(
    tmp_path: Path, static_onnx: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    fixed, pooled = static_onnx
    cases = [
        ([str(fixed), "--dynamic-batching"], "has no batch axis"),
        (
            [str(fixed), "--shape", "x:1x3x16x16,4x3x16x16,8x3x16x16"],
            "does not fit the model",
        ),  # plan vs graph
        ([str(pooled)], "output 'y' has shape"),
    ]
    for args, message in cases:
        code, _, err = run_cli(
            ["export-triton", *args, "--target", "h100", "--precision", "fp32", "--out", str(tmp_path)],
            capsys,
        )
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_signed_triton_bundle_verifies(
    tmp_path: Path, effnet_onnx: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    private, public = generate_keypair(tmp_path / "k.pem")
    code, out, err = run_cli(
        [
            "export-triton",
            str(effnet_onnx),
            "--target",
            "l4",
            "--precision",
            "fp16",
            "--out",
            str(tmp_path / "repo"),
            "--sign",
            str(private),
            "--bundle-out",
            str(tmp_path / "b"),
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    info = json.loads(out)
    report = verify_bundle(info["bundle"], load_public_key(public), device="skip", extract_to=tmp_path / "x")
    files = {
        p.relative_to(tmp_path / "repo" / "efficientnet_lite0")
        for p in (tmp_path / "repo" / "efficientnet_lite0").rglob("*")
        if p.is_file()
    }
    assert report.files_checked == len(files) and report.manifest.requires["sm"] == "sm89"
    assert (tmp_path / "x" / "config.pbtxt").read_bytes() == Path(info["config"]).read_bytes()
    assert load_private_key(str(private)) is not None


def _tritonserver() -> tuple[Path, Path] | None:
    """Triton's server binary as the nvidia-pytriton wheel ships it (with only the Python backend)."""
    root = Path(__file__).resolve().parents[3]
    for site in sorted(root.glob(".venv-triton/lib/python*/site-packages")):
        binary = site / "pytriton" / "tritonserver" / "bin" / "tritonserver"
        if binary.is_file():
            return binary, site
    return None


def test_real_tritonserver_accepts_the_configs(
    tmp_path: Path, effnet_onnx: Path, effnet_int8_onnx: Path, photo_dir: Path
) -> None:
    """Triton's own repository poll (config parse, normalization, ValidateModelConfig) passes for both
    repositories: each model fails only where the TensorRT / ONNX Runtime backend library is missing from
    this server build, while a config Triton refuses (the control) fails at the poll."""
    found = _tritonserver()
    if found is None:
        pytest.skip(
            "no Triton server binary: python3 -m venv .venv-triton && "
            ".venv-triton/bin/pip install --no-deps nvidia-pytriton==0.7.0"
        )
    binary, site = found
    repo = tmp_path / "repo"
    export_triton(effnet_onnx, "h100", "fp16", repo, warmup_data=photo_dir)
    cpu = export_triton(
        effnet_onnx,
        "ort-cpu",
        "int8",
        repo,
        name="effnet_cpu",
        qdq_onnx=effnet_int8_onnx,
        warmup_data=photo_dir,
    )
    control = repo / "control"
    shutil.copytree(cpu.model_dir, control)
    text = (control / "config.pbtxt").read_text().replace('"effnet_cpu"', '"control"')
    (control / "config.pbtxt").write_text(
        text.replace("preferred_batch_size: [ 32 ]", "preferred_batch_size: [ 33 ]")
    )
    env = {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": str(site / "nvidia_pytriton.libs")}
    run = subprocess.run(
        [
            str(binary),
            f"--model-repository={repo}",
            f"--backend-directory={binary.parents[1] / 'backends'}",
            "--allow-http=false",  # no ports: the server only loads the repository, then exits
            "--allow-grpc=false",
            "--allow-metrics=false",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    log = run.stdout + run.stderr
    assert "Poll failed for model directory 'control': dynamic batching preferred size" in log, log[-3000:]
    for model, backend in (("efficientnet_lite0", "tensorrt"), ("effnet_cpu", "onnxruntime")):
        assert (
            f"failed to load '{model}' version 1: Invalid argument: unable to find backend library for "
            f"backend '{backend}'" in log
        ), log[-3000:]
        assert f"Poll failed for model directory '{model}'" not in log


def test_batch_only_output_becomes_dims_1_reshaped(pb2: ModuleType, tmp_path: Path) -> None:
    import torch

    class Score(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean((1, 2, 3))  # one score per sample: shape [batch]

    path = tmp_path / "score.onnx"
    torch.onnx.export(
        Score(),
        (torch.zeros(2, 3, 8, 8),),
        str(path),
        input_names=["x"],
        output_names=["score"],
        dynamic_axes={"x": {0: "batch"}, "score": {0: "batch"}},
        dynamo=False,
    )
    cfg = parse_config(pb2, export_triton(path, "l40s", "fp32", tmp_path / "repo").config_path)
    (out,) = cfg.output
    assert cfg.max_batch_size == 32 and list(out.dims) == [1]
    assert out.HasField("reshape") and list(out.reshape.shape) == []

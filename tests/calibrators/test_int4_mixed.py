"""`--precision int4-weights,int8` on MiniLM-L6 (few sentences): every weight layer is either INT4
weight-only (no activation Q/DQ on it: TensorRT has no W4A8) or INT8 Q/DQ, the gate holds, the report
counts both kinds, and the plan refuses targets that cannot run INT4 weights. And awq-gptq (the default
INT4 algorithm) against RTN on held-out sentences."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_helpers import run_cli
from onnx import TensorProto
from test_quantize_models import build_minilm_onnx

from calibrators.int4 import quantize_int4
from trtbuild.core import output_set
from trtbuild.core.errors import TrtbuildError
from trtbuild.core.inputs import parse_profile_spec
from trtbuild.plan import make_plan


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, np.ndarray]]]:
    return build_minilm_onnx(tmp_path_factory.mktemp("minilm_int4_mixed"))


def test_int4_int8_mixes_weight_layers_and_plan_rules(
    minilm: tuple[Path, list[dict[str, np.ndarray]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, samples = minilm
    data = tmp_path / "tokens.npz"
    np.savez(data, **{k: np.concatenate([s[k] for s in samples]) for k in samples[0]})
    out = tmp_path / "out"
    args = ["quantize", str(path), "--data", str(data), "--precision", "int4-weights,int8"]
    args += ["--int4-algorithm", "awq", "--holdout", "8", "--out-dir", str(out), "--json"]
    # all-INT4 fails this gate on MiniLM and all-INT8 passes it, so the search has to mix; the output
    # kind override reaches the gate (it used to be dropped silently in this mode)
    output = onnx.load(str(path), load_external_data=False).graph.output[0].name
    kind = ["--output-kind", f"{output}=regression"]
    code, stdout, err = run_cli([*args, *kind, "--min-fidelity", "cosine=0.975"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["fidelity"]["outputs"][0]["kind"] == "regression"
    assert sorted(p.name for p in out.iterdir()) == ["minilm.int4int8.json", "minilm.int4int8.onnx"]
    assert output_set.verify(out / "minilm.int4int8.json") == []
    int4, int8 = set(summary["int4_layers"]), set(summary["int8_weight_layers"])
    assert int4 and int8 and not int4 & int8 and len(int4) + len(int8) == 36
    assert summary["counts"] == {"int4_weight_only": len(int4), "int8": len(int8)}
    assert summary["fidelity"]["outputs"][0]["cosine"] >= 0.975
    trials = {t["int4_layers"]: t["passed"] for t in summary["trials"]}
    assert trials[36] is False and trials[0] is True and trials[len(int4)] is True
    # the INT4 layers are the least noisy ones
    noise = summary["int4_noise"]
    assert max(noise[n] for n in int4) <= min(noise[n] for n in int8)
    assert summary["matmul_weight_bytes"]["mixed"] < summary["matmul_weight_bytes"]["fp32"] / 4

    model = onnx.load(str(out / "minilm.int4int8.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.name not in int4 | int8:
            continue
        weight_dq = producer[node.input[1]]
        assert weight_dq.op_type == "DequantizeLinear"
        kind = inits[weight_dq.input[0]].data_type
        activation = producer.get(node.input[0])
        if node.name in int4:  # W4A16: INT4 weight, the activation not quantized
            assert kind == TensorProto.INT4
            assert activation is None or activation.op_type != "DequantizeLinear"
        else:  # W8A8
            assert kind == TensorProto.INT8 and activation is not None
            assert activation.op_type == "DequantizeLinear"

    qdq = out / "minilm.int4int8.onnx"
    shapes = [parse_profile_spec(f"{name}:1x24,8x128,32x128") for name in ("input_ids", "attention_mask")]
    plan = make_plan(path, "orin-jp6.1", "int8", qdq_onnx=qdq, shapes=shapes, out_root=tmp_path / "eng")
    assert any("mixed INT4 weight-only / INT8" in note for note in plan.notes)
    for target, dla, reason in (
        ("xavier-jp5", None, "sm80+"),
        ("orin-jp6.0", None, "TensorRT 10.0+"),
        ("orin-jp6.1", 0, "DLA cannot run"),
    ):
        with pytest.raises(TrtbuildError, match=reason):
            make_plan(
                path, target, "int8", qdq_onnx=qdq, shapes=shapes, dla_core=dla, out_root=tmp_path / "e"
            )

    failed = tmp_path / "failed"
    args[args.index(str(out))] = str(failed)
    code, _, err = run_cli([*args, "--min-fidelity", "cosine=0.9999"], capsys)
    assert code == 2 and err.count("error:") == 1 and "every weight layer INT8" in err
    assert "Traceback" not in err and not failed.exists()
    code, _, err = run_cli([*args, "--output-kind", "nope=regression"], capsys)
    assert code == 2 and err.count("error:") == 1 and "nope" in err and not failed.exists()


def test_awq_gptq_beats_rtn_on_held_out_sentences(
    minilm: tuple[Path, list[dict[str, np.ndarray]]], tmp_path: Path
) -> None:
    path, samples = minilm
    cosine = {}
    for algorithm in ("rtn", "awq-gptq"):
        result = quantize_int4(
            path, samples, tmp_path / algorithm, algorithm=algorithm, holdout=8, min_fidelity="cosine=0.9"
        )
        cosine[algorithm] = result.fidelity.outputs[0].cosine
    assert result.algorithm == "awq-gptq" and {layer.input_scale for layer in result.layers} == {"mul"}
    assert all(layer.alpha is not None for layer in result.layers)
    assert cosine["awq-gptq"] > cosine["rtn"]

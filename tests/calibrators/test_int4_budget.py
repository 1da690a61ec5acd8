"""`--weight-budget` on MiniLM-L6 (few sentences): finer INT4 blocks for the layers whose weight noise
falls most per byte, the MatMul weights within the budget as the graph stores them, each
DequantizeLinear carrying its layer's block, and bad budgets refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_helpers import run_cli
from onnx import helper
from test_quantize_models import build_minilm_onnx

from calibrators.int4 import budget, output_noise, quantize_int4
from calibrators.int4.graph import find_layers
from trtbuild.core import output_set
from trtbuild.core.errors import TrtbuildError


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, np.ndarray]]]:
    return build_minilm_onnx(tmp_path_factory.mktemp("minilm_int4_budget"))


def _graph_blocks(path: Path) -> dict[str, int]:
    """MatMul node -> block_size of the DequantizeLinear feeding its weight, as written."""
    model = onnx.load(str(path))
    dqs = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    out = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in dqs:
            attrs = {a.name: helper.get_attribute_value(a) for a in dqs[node.input[1]].attribute}
            out[node.name] = int(attrs["block_size"])
    return out


def _matmul_bytes(path: Path) -> int:
    """INT4 codes (half a byte each) + FP32 scales behind the MatMul weights, from the file."""
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    total = 0.0
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.name.endswith("_weight_dq"):
            codes, scales = inits[node.input[0]], inits[node.input[1]]
            total += np.prod(codes.dims) / 2 + np.prod(scales.dims) * 4
    return int(total)


def test_weight_budget_buys_finer_blocks_where_noise_falls_most(
    minilm: tuple[Path, list[dict[str, np.ndarray]]], tmp_path: Path
) -> None:
    path, samples = minilm
    kwargs = {"holdout": 8, "min_fidelity": "cosine=0.9", "threads": 1}
    base = quantize_int4(path, samples, tmp_path / "base", algorithm="rtn", **kwargs)
    spent = quantize_int4(path, samples, tmp_path / "budget", algorithm="rtn", weight_budget="1/7", **kwargs)
    fp32 = spent.fp32_weight_bytes
    assert base.int4_weight_bytes < spent.int4_weight_bytes <= fp32 / 7
    assert _matmul_bytes(spent.onnx_path) == spent.int4_weight_bytes  # the file holds what the report says
    written = _graph_blocks(spent.onnx_path)
    assert written == {layer.node: layer.block for layer in spent.layers}
    assert set(written.values()) <= {128, 64, 32} and min(written.values()) < 128
    # the budget went first to the move with the most noise removed per extra byte, and the report's
    # noise table gives the same choice again
    report = json.loads(spent.report_path.read_text())["weight_budget"]
    assert report["blocks"] == written and report["ratio"] <= 1 / 7
    noise = {node: {int(b): v for b, v in table.items()} for node, table in report["noise"].items()}
    layers = find_layers(onnx.load(str(path)))
    assert budget.choose_blocks(layers, noise, 128, 1 / 7).blocks == written
    moves = {
        (layer.node, b): (noise[layer.node][128] - noise[layer.node][b])
        / (budget.int4_bytes(layer.k, layer.n, b) - budget.int4_bytes(layer.k, layer.n, 128))
        for layer in layers
        for b in noise[layer.node]
        if b < 128
    }
    assert written[max(moves, key=moves.__getitem__)[0]] < 128
    meta = {p.key: p.value for p in onnx.load(str(spent.onnx_path)).metadata_props}
    assert meta["trtbuild.int4.block_size"] == ",".join(map(str, sorted(set(written.values()), reverse=True)))
    # finer blocks where they count beat block 128 everywhere on held-out sentences
    assert spent.fidelity.outputs[0].cosine > base.fidelity.outputs[0].cosine
    assert output_set.verify(spent.report_path) == []


def test_awq_gptq_quantizes_each_layer_at_its_budgeted_block(
    minilm: tuple[Path, list[dict[str, np.ndarray]]], tmp_path: Path
) -> None:
    path, samples = minilm
    result = quantize_int4(  # encoder layer 0 only (6 MatMuls, 4 groups): awq-gptq in seconds
        path,
        samples,
        tmp_path,
        weight_budget="0.14",
        exclude=[r"layer\.[1-5]/"],
        holdout=8,
        min_fidelity="cosine=0.9",
        threads=1,
    )
    assert result.algorithm == "awq-gptq" and len(result.layers) == 6
    assert result.int4_weight_bytes <= 0.14 * result.fp32_weight_bytes
    written = _graph_blocks(result.onnx_path)
    assert written == {layer.node: layer.block for layer in result.layers} and len(set(written.values())) > 1


def test_bad_weight_budgets_are_refused_before_any_work(
    minilm: tuple[Path, list[dict[str, np.ndarray]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, samples = minilm
    data = tmp_path / "tokens.npz"
    np.savez(data, **{k: np.concatenate([s[k] for s in samples]) for k in samples[0]})
    for flags, says in (
        (["--weight-budget", "1/8"], "below what block 128 needs (1/7.53)"),
        (["--weight-budget", "2"], "not a fraction"),
        (["--weight-budget", "a/7"], "not a fraction"),
        (["--weight-budget", "1/7", "--precision", "int4-weights,int8"], "applies to --precision"),
    ):
        out = tmp_path / "out"
        argv = ["quantize", str(path), "--data", str(data), "--precision", "int4-weights", *flags]
        code, _, err = run_cli([*argv, "--out-dir", str(out)], capsys)
        assert code == 2 and err.count("error:") == 1 and says in err and not out.exists(), err
    out = tmp_path / "out"
    argv = ["quantize", str(path), "--data", str(data), "--precision", "int4-weights", "--out-dir", str(out)]
    extra = ["--weight-budget", "1/7", "--int4-algorithm", "rtn", "--holdout", "8"]
    extra += ["--min-fidelity", "cosine=0.9"]
    code, stdout, _ = run_cli([*argv, *extra], capsys)
    assert code == 0 and "(rtn, block 128 x" in stdout and ", 32 x" in stdout, stdout
    assert sorted(p.name for p in out.iterdir()) == ["minilm.int4.json", "minilm.int4.onnx"]
    with pytest.raises(TrtbuildError, match="below what block 64 needs"):
        budget.check_fits(find_layers(onnx.load(str(path))), 64, 1 / 7.2)


def test_output_noise_sees_what_local_noise_misses(minilm: tuple[Path, list[dict[str, np.ndarray]]]) -> None:
    """Query/key projections round as badly as the FFN's first MatMul locally, but softmax damps them: at
    the embedding they count far less, which is why the budget weighs layers by their output noise."""
    path, samples = minilm
    model = onnx.load(str(path))
    layers = find_layers(model)
    batch = {k: np.concatenate([s[k] for s in samples[:8]]) for k in samples[0]}
    noise = output_noise.output_noise(model, layers, [batch], 128, threads=1)
    assert set(noise) == {layer.node for layer in layers} and all(v > 0 for v in noise.values())
    mean = lambda part: np.mean([v for node, v in noise.items() if part in node])  # noqa: E731
    ffn = mean("/intermediate/")
    assert mean("/self/query/") < ffn / 2 and mean("/self/key/") < ffn / 2

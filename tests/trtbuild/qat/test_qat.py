"""QAT and 2:4 recovery training (trtbuild/qat/, `trtbuild qat`) on a tiny real conv net, plus one
EfficientNet-Lite0 run: fake quantization equals the Q/DQ graph's arithmetic, the 2:4 rule, the mapping of
the ONNX placement back to modules, exact resume, the artifacts (same structure as PTQ's), `plan` turning
sparse kernels on by itself, and one-line errors that write nothing."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cli_helpers import run_cli
from qat_models import Interrupt, checkpoint_state, stop_at, tiny_data, tiny_net

from calibrators import fidelity
from calibrators import weights as wq
from calibrators.quantize import quantize
from calibrators.sparsity import analyze, is_2to4
from trtbuild.plan import make_plan
from trtbuild.qat.fake_quant import (
    ActivationQuantizer,
    QuantHooks,
    fake_quant_activation,
    fake_quant_weight,
)
from trtbuild.qat.prune import mask_2to4, plan_pruning
from trtbuild.qat.train import TrainConfig, Trainer
from trtbuild.trtexec import command_line

TINY = f"{Path(__file__).with_name('qat_models.py')}:tiny_net"
ARTIFACTS = (".onnx", ".int8.onnx", ".calib.cache", ".ranges.json", ".fidelity.json", ".qat.json")


def test_fake_quant_is_the_qdq_arithmetic() -> None:
    """Per-channel weights round exactly like plan_qdq's int8 weights; activations like Q then DQ."""
    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    scales = wq.per_channel_scales(w.numpy(), 0)
    expected = wq.dequantize_weight(wq.quantize_weight(w.numpy(), scales, 0), scales, 0)
    np.testing.assert_allclose(fake_quant_weight(w).numpy(), expected, rtol=1e-6, atol=1e-7)
    x = torch.linspace(-3, 3, 601).reshape(1, -1)
    step = torch.tensor(2.0 / 127)
    # ONNX Runtime's QuantizeLinear -> DequantizeLinear (int8, zero point 0): it saturates at -128, so a
    # clipped negative value is -128 steps (the student used to clip at -127).
    h = onnx.helper
    graph = h.make_graph(
        [
            h.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            h.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        "qdq",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 601])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 601])],
        [
            h.make_tensor("s", onnx.TensorProto.FLOAT, [], [step.item()]),
            h.make_tensor("z", onnx.TensorProto.INT8, [], [0]),
        ],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    q = fidelity.session(model).run(None, {"x": x.numpy()})[0]
    assert q.min() == pytest.approx(-128 * step.item()) and q.max() == pytest.approx(127 * step.item())
    np.testing.assert_allclose(fake_quant_activation(x, step).detach().numpy(), q, atol=1e-6)
    # Gradients flow to both the input (inside the range only) and the step size.
    x.requires_grad_(True)
    s = torch.nn.Parameter(step.clone())
    fake_quant_activation(x, s).sum().backward()
    assert x.grad is not None and x.grad[0, 300] == 1 and x.grad[0, 0] == 0
    assert s.grad is not None and s.grad != 0


def test_mask_2to4_keeps_two_largest_along_input_channels() -> None:
    w = torch.randn(16, 32, 3, 3, generator=torch.Generator().manual_seed(1))
    mask = mask_2to4(w)
    pruned = (w * mask).numpy()
    assert is_2to4(pruned, axis=1) and not is_2to4(pruned, axis=0)
    assert mask.sum().item() == w.numel() / 2
    group = w[0, 0:4, 1, 1].abs()
    kept = mask[0, 0:4, 1, 1].bool()
    assert group[kept].min() >= group[~kept].max()
    decisions = {d.module: d.reason for d in plan_pruning(tiny_net())}
    assert decisions["pw.0"] is None and decisions["head"] is None
    assert "depthwise" in (decisions["dw.0"] or "") and "multiple of 4" in (decisions["stem.0"] or "")


def _trainer(seed_model: torch.nn.Module, config: TrainConfig, on_step=None) -> tuple[Trainer, QuantHooks]:  # type: ignore[no-untyped-def]
    student = copy.deepcopy(seed_model)
    teacher = copy.deepcopy(seed_model)
    quantizers = [ActivationQuantizer("a", 3.0), ActivationQuantizer("b", 3.0)]
    hooks = QuantHooks()
    hooks.quantize_input(student.pw[0], quantizers[0])
    hooks.quantize_input(student.expand, quantizers[1])
    hooks.quantize_weight(student.pw[0])
    hooks.quantize_weight(student.expand)
    x = tiny_data(24, seed=2)
    samples = [{"x": x[i : i + 1]} for i in range(24)]
    trainer = Trainer(
        student,
        teacher,
        [q.step for q in quantizers],
        samples[:16],
        [{"x": x[16:]}],
        ["x"],
        ["y"],
        {},
        config,
        torch.device("cpu"),
        on_step=on_step,
    )
    return trainer, hooks


def test_resume_equals_uninterrupted_and_seed_repeats(tmp_path: Path, one_thread: None) -> None:
    model = tiny_net()
    config = TrainConfig(
        steps=4, batch_size=4, lr=1e-3, eval_every=2, checkpoint_every=2, patience=10, seed=3
    )

    _trainer(model, config)[0].fit(tmp_path / "a.ckpt")
    _trainer(model, config)[0].fit(tmp_path / "b.ckpt")
    a, b = checkpoint_state(tmp_path / "a.ckpt"), checkpoint_state(tmp_path / "b.ckpt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["student.pw.0.weight"], model.state_dict()["pw.0.weight"])  # it trained

    with pytest.raises(Interrupt):
        _trainer(model, config, on_step=stop_at(3))[0].fit(tmp_path / "c.ckpt")
    result = _trainer(model, config)[0].fit(tmp_path / "c.ckpt", resume=True)
    assert result.resumed_from == 2 and result.steps_run == 4
    c = checkpoint_state(tmp_path / "c.ckpt")
    assert all(torch.equal(a[k], c[k]) for k in a)
    # The returned model is the best held-out one: step 0 (PTQ) unless training improved on it.
    scores = {e.step: e.score for e in result.history}
    assert scores[result.best_step] == min(scores.values())


def _labeled_trainer(loader: list, loss_fn) -> Trainer:  # type: ignore[no-untyped-def, type-arg]
    model = tiny_net()
    held = [{"x": tiny_data(4, seed=4)}]
    config = TrainConfig(steps=2, batch_size=4, eval_every=1, checkpoint_every=1)
    return Trainer(model, copy.deepcopy(model), [], [], held, ["x"], ["y"], {}, config, torch.device("cpu"),
                   loss_fn, loader)  # fmt: skip


def test_labeled_loader_of_numpy_batches_trains() -> None:
    """The Python API's labeled loader: numpy batches are taken as tensors (crashed on `.to`)."""
    x, labels = tiny_data(8, seed=3), np.arange(8) % 10
    loader = [(x[i : i + 4], labels[i : i + 4]) for i in (0, 4)]
    trainer = _labeled_trainer(loader, lambda s, t: torch.nn.functional.cross_entropy(s[0], t[0]))
    result = trainer.fit()
    assert result.steps_run == 2 and [e.step for e in result.history] == [0, 1, 2]
    assert all(np.isfinite(e.loss) for e in result.history[1:])


@pytest.mark.parametrize(
    ("loss_fn", "message"),
    [
        (None, "the training loss fails on the model's outputs [[4, 10]], targets [[4]]"),
        (lambda s, t: (s[0] - t[0]) ** 2, "the training loss must be one scalar tensor, got [4, 10]"),
    ],
)
def test_labeled_loss_errors_are_one_line(loss_fn, message: str) -> None:  # type: ignore[no-untyped-def]
    """Labels without a loss for them (the default MSE needs outputs' shapes) or a loss that is not a
    scalar: one TrtbuildError line, not a traceback from inside training."""
    from trtbuild.core.errors import TrtbuildError

    x = tiny_data(4, seed=3)
    loader = [(torch.from_numpy(x), torch.arange(4))]
    if loss_fn is not None:
        loader = [(torch.from_numpy(x), torch.zeros(4, 10))]
    with pytest.raises(TrtbuildError) as err:
        _labeled_trainer(loader, loss_fn).fit()
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A dense qat() run of the tiny net interrupted at QAT step 2 (checkpoint every step)."""
    from trtbuild.qat import qat

    root = tmp_path_factory.mktemp("interrupted")
    np.save(root / "x.npy", tiny_data(32, seed=2))

    def stop(stage: str, step: int, *_: object) -> None:
        if stage == "QAT" and step == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        qat(tiny_net(), ["x:1x3x16x16"], root / "x.npy", root / "out", on_step=stop, **RESUMED)  # type: ignore[arg-type]
    return root / "x.npy", root / "out"


RESUMED = {"steps": 4, "eval_every": 2, "checkpoint_every": 1, "holdout": 8, "min_fidelity": "0"}


@pytest.mark.parametrize(
    ("change", "differs"),
    [({"exclude_op_types": ["Gemm"]}, "exclude_op_types"), ({"sparsity": "2:4"}, "sparsity")],
)
def test_resume_with_other_options_is_refused_and_writes_nothing(
    interrupted: tuple[Path, Path], change: dict[str, object], differs: str, tmp_path: Path, one_thread: None
) -> None:
    """Another placement (one step size fewer: crashed in zip) or 2:4 on top of a dense run's checkpoint
    (silently trained on from the dense weights) is one error naming the option."""
    import shutil

    from trtbuild.core.errors import TrtbuildError
    from trtbuild.qat import qat

    data, out = interrupted
    shutil.copytree(out, tmp_path / "out")
    with pytest.raises(TrtbuildError, match=f"belongs to another run .*{differs}"):
        qat(tiny_net(), ["x:1x3x16x16"], data, tmp_path / "out", resume=True, **RESUMED, **change)  # type: ignore[arg-type]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoints"]
    # the same options resume it (the run key does not change between runs)
    resumed = qat(tiny_net(), ["x:1x3x16x16"], data, tmp_path / "out", resume=True, **RESUMED)
    assert (
        resumed.training["qat"].resumed_from == 1 and resumed.training["qat"].steps_run == 4
    )  # stopped in step 2


def test_resume_from_another_models_checkpoints_is_refused(
    interrupted: tuple[Path, Path], tmp_path: Path, one_thread: None
) -> None:
    """A checkpoints folder of another model (the API names a module by its class, the CLI by its
    attribute) silently started training over; now it is one error naming what the folder holds."""
    import shutil

    from trtbuild.core.errors import TrtbuildError
    from trtbuild.qat import qat

    data, out = interrupted
    shutil.copytree(out, tmp_path / "out")
    for ckpt in (tmp_path / "out" / "checkpoints").glob("*.ckpt"):
        ckpt.rename(ckpt.with_name("othernet" + ckpt.name[ckpt.name.index(".") :]))
    with pytest.raises(TrtbuildError, match=r"has no checkpoint of .tinynet. \(it has othernet\)"):
        qat(tiny_net(), ["x:1x3x16x16"], data, tmp_path / "out", resume=True, **RESUMED)


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:  # type: ignore[type-arg]
    """`trtbuild qat --sparsity 2:4` on the tiny net, through the real CLI."""
    root = tmp_path_factory.mktemp("qat")
    data = root / "x.npy"
    np.save(data, tiny_data(48, seed=1))
    out = root / "out"
    from trtbuild.cli import main

    args = [
        "qat",
        TINY,
        "--input",
        "x:1x3x16x16",
        "--dynamic-batch",
        "--data",
        str(data),
        "--sparsity",
        "2:4",
        "--steps",
        "6",
        "--eval-every",
        "3",
        "--checkpoint-every",
        "3",
        "--holdout",
        "16",
        "--min-fidelity",
        "0.5",
        "--out-dir",
        str(out),
        "--json",
    ]
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
        main(args)
    return out, data, json.loads(buffer.getvalue())


def test_sparse_qat_writes_quantize_artifacts(sparse_run: tuple[Path, Path, dict]) -> None:  # type: ignore[type-arg]
    out, data, info = sparse_run
    for suffix in ARTIFACTS:
        assert (out / f"tiny_net{suffix}").is_file(), suffix
    assert json.loads((out / "tiny_net.ranges.json").read_text())["method"] == "qat-lsq"
    assert info["sparsity"]["pruned_layers"] == 3 and len(info["sparsity"]["skipped"]) == 2
    assert info["mapping"]["quantized_modules"] >= 2
    # The fine-tuned FP32 graph and its Q/DQ graph both keep the 2:4 pattern TensorRT checks.
    for name in ("tiny_net.onnx", "tiny_net.int8.onnx"):
        report = analyze(onnx.load(str(out / name)))
        assert report.is_sparse_model and len(report.sparse) == 3, name
    # Same structure as PTQ's: quantize on the same fine-tuned graph places the same Q/DQ nodes.
    ptq = quantize(
        out / "tiny_net.onnx",
        data,
        out.parent / "ptq",
        holdout=16,
        min_fidelity="0.5",
        bias_correction=False,
        show_progress=False,
    )
    qat_graph = onnx.load(str(out / "tiny_net.int8.onnx")).graph
    ptq_graph = onnx.load(str(ptq.onnx_path)).graph
    assert [n.op_type for n in qat_graph.node] == [n.op_type for n in ptq_graph.node]
    assert json.loads((out / "tiny_net.fidelity.json").read_text())["plan"]["quantized_nodes"] == list(
        ptq.plan.quantized_nodes
    )


def test_plan_turns_on_sparsity_for_a_2to4_model(sparse_run: tuple[Path, Path, dict], tmp_path: Path) -> None:  # type: ignore[type-arg]
    out, _, _ = sparse_run
    plan = make_plan(
        out / "tiny_net.onnx", "a100", "int8", qdq_onnx=out / "tiny_net.int8.onnx", out_root=tmp_path
    )
    assert "SPARSE_WEIGHTS" in plan.builder_flags and "--sparsity=enable" in command_line(plan)
    assert any("3 of 3 eligible layers" in n for n in plan.notes)
    dense = make_plan(out / "tiny_net.onnx", "a100", "fp16", sparsity=False, out_root=tmp_path)
    assert "SPARSE_WEIGHTS" not in dense.builder_flags
    old_gpu = make_plan(out / "tiny_net.onnx", "xavier-jp5", "fp16", out_root=tmp_path)
    assert "SPARSE_WEIGHTS" not in old_gpu.builder_flags and any("run dense" in n for n in old_gpu.notes)


BAD_MODELS = """
import torch
from torch import nn
class Pool(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))
def pool():
    return Pool()
def stem_only():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten())
class FixedBatch(nn.Module):  # exports and verifies at batch 1; fails on the batches QAT trains on
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16 * 16, 10)
    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).reshape(1, -1))
def fixed_batch():
    return FixedBatch()
def mlp():
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))
"""


@pytest.mark.parametrize(
    ("source", "extra", "message"),
    [
        ("tiny", ["--sparsity", "1:4"], "Invalid value for '--sparsity'"),
        ("tiny", ["--sparsity", "2:4", "--sparse-max-dense", "1000"], "no budget was given"),
        ("tiny", ["--input", "x:1x3x8x8"], "has shape (3, 16, 16) per sample"),
        ("pool", [], "no Conv/Linear layer with weights"),
        ("stem_only", ["--sparsity", "2:4"], "can take 2:4 sparsity"),
        ("fixed_batch", [], "the model fails on a batch of 8 samples"),
        ("mlp", ["--input", "x:1x12", "--data", "feats.npy"], "GEMV-shaped Gemm (one row: input [1, 12])"),
        ("tiny", ["--input", "x:1x5x16x16", "--data", "five.npy"], "fails on the declared inputs"),
        ("tiny", ["--margin-term", "margin", "--margin-weight", "-1"], "--margin-weight must be >= 0"),
        ("tiny", ["--select-on", "onnx"], "Invalid value for '--select-on'"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    source: str, extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.py").write_text(BAD_MODELS)
    np.save(tmp_path / "x.npy", tiny_data(24))
    np.save(tmp_path / "five.npy", np.zeros((24, 5, 16, 16), np.float32))
    np.save(tmp_path / "feats.npy", np.random.default_rng(0).normal(size=(24, 12)).astype(np.float32))
    spec = TINY if source == "tiny" else f"{tmp_path / 'bad.py'}:{source}"
    args = [
        "qat",
        spec,
        "--data",
        str(tmp_path / "x.npy"),
        "--holdout",
        "8",
        "--out-dir",
        str(tmp_path / "out"),
    ]
    if "--input" not in extra:
        args += ["--input", "x:1x3x16x16"]
    if "--data" in extra:
        args = [
            a if a != str(tmp_path / "x.npy") else str(tmp_path / extra[extra.index("--data") + 1])
            for a in args
        ]
        extra = [e for e in extra if e not in ("--data", "five.npy", "feats.npy")]
    code, _, err = run_cli(args + extra, capsys)
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_effnet_qat_keeps_ptq_structure_and_fidelity(
    effnet_model: torch.nn.Module, photo_batch: np.ndarray, tmp_path: Path, one_thread: None
) -> None:
    """A few QAT steps on EfficientNet-Lite0: quantize's artifacts, PTQ's Q/DQ structure, no fidelity loss."""
    from trtbuild.qat import qat

    samples = [{"images": photo_batch[i : i + 1]} for i in range(len(photo_batch))]
    result = qat(
        copy.deepcopy(effnet_model),
        ["images:1x3x224x224"],
        samples,
        tmp_path / "qat",
        steps=4,
        eval_every=2,
        batch_size=4,
        holdout=12,
        output_names=["logits"],
        min_fidelity="0.5",
        dynamic_batch=True,
        rounding_budget_s=20.0,  # the learned-rounding start, bounded for test time
    )
    # the start is whichever PTQ measured closer to FP32 on the held-out crops (learned on a tie)
    scores = result.start_scores
    assert set(scores) == {"learned", "nearest"}
    assert result.start == ("learned" if scores["learned"] <= scores["nearest"] else "nearest")
    assert result.ptq.score() == scores[result.start]
    stem = result.onnx_path.stem  # an nn.Module instance is named after its class
    for suffix in ARTIFACTS:
        assert (tmp_path / "qat" / f"{stem}{suffix}").is_file(), suffix
    plan = result.quantized.plan
    weighted = [n for n in plan.quantized_nodes if plan.node_types[n] in ("Conv", "Gemm", "MatMul")]
    assert result.mapping is not None and len(result.mapping.weighted) == len(weighted) > 40
    ptq = quantize(
        result.onnx_path,
        samples,
        tmp_path / "ptq",
        holdout=12,
        min_fidelity="0.5",
        bias_correction=False,
        show_progress=False,
    )
    assert list(ptq.plan.quantized_nodes) == list(result.quantized.plan.quantized_nodes)
    assert set(ptq.plan.activations) == set(result.quantized.plan.activations)
    # Both against the original FP32 model: training keeps the best held-out step (step 0 = the PTQ graph),
    # so the shipped graph is no worse than its start (KL: top-1 on 12 crops flips on one borderline crop).
    qat_kl, ptq_kl = result.qat.outputs[0].kl, result.ptq.outputs[0].kl
    assert qat_kl is not None and ptq_kl is not None and qat_kl <= ptq_kl * 1.1

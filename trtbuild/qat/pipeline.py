"""`qat()`: recovery training from the PyTorch source, ending in exactly the artifacts `quantize` writes.

export (export/pipeline.py) -> [2:4 prune + FP32 recovery] -> calibrate + Q/DQ placement on the exported
graph (calibrators/qdq.py) -> map the placement back to modules (mapping.py) -> LSQ fake-quant distillation
(train.py) -> export the fine-tuned FP32 weights -> calibrators.quantize.quantize with the learned ranges.
So the Q/DQ ONNX, calibration cache, ranges and fidelity report come from the same code as PTQ's, with
the same structure, and every later stage (plan, export-jetson, export-snpe, bundle) takes them unchanged.
Nothing lands in the output folder unless the final fidelity gate passes (checkpoints excepted).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from calibrators import fidelity, gate_stats, near_ties
from calibrators.calibrate import compute_ranges
from calibrators.collect import DEFAULT_BATCH_SIZE, collect, load_model
from calibrators.data import ModelInput, model_inputs, open_data
from calibrators.fidelity import FidelityReport
from calibrators.methods import DEFAULT_METHOD
from calibrators.preprocess import Preprocess
from calibrators.qdq import QdqOptions, QdqPlan, apply_qdq, plan_qdq, quantizable_activations
from calibrators.quantize import QuantizeResult, quantize
from calibrators.quantize_settings import QuantizeSettings
from calibrators.ranges import RangeSet, TensorRange
from calibrators.sparsity import PATTERN
from trtbuild.core import atomic
from trtbuild.core.defaults import DEFAULT_TRT_VERSION
from trtbuild.core.errors import TrtbuildError
from trtbuild.qat import graph_score, margin_loss, selection, sparse_recipe
from trtbuild.qat.batch_check import check_batch, largest_batch
from trtbuild.qat.fake_quant import ActivationQuantizer, QuantHooks
from trtbuild.qat.losses import LOSSES, kind_loss
from trtbuild.qat.mapping import QuantMap, map_plan, weighted_modules
from trtbuild.qat.prune import PruneDecision, plan_pruning
from trtbuild.qat.ptq_start import fold_plan, learned_plan
from trtbuild.qat.qat_views import AUGMENTS, AugmentedViews, augmented_views
from trtbuild.qat.smoothing import Smoothing, smooth_graph
from trtbuild.qat.train import Evaluation, LossFn, TrainConfig, Trainer, TrainResult, distillation_loss

log = logging.getLogger(__name__)
SPARSITY_PATTERNS = (PATTERN,)
STARTS = ("learned", "nearest")  # QAT's starting point: learned-rounding PTQ (ptq_start.py) or nearest
FIT_SAMPLES = 64  # calibration samples the 2:4 re-fit uses (input covariances of each layer)
FIT_BATCH = 16
StepCallback = Callable[[str, int, int, float, Evaluation | None], None]


@dataclass
class QatResult:
    onnx_path: Path  # the fine-tuned FP32 ONNX (what `plan` and the bundles take as the model)
    quantized: QuantizeResult
    report_path: Path
    ptq: FidelityReport  # the same placement with calibrated ranges, before training, vs the original FP32
    qat: FidelityReport  # the QAT Q/DQ graph vs the original FP32 (quantize's report compares it with the
    # fine-tuned FP32 graph it ships with)
    training: dict[str, TrainResult] = field(default_factory=dict)
    mapping: QuantMap | None = None
    pruning: list[PruneDecision] = field(default_factory=list)
    seconds: float = 0.0
    smoothing: Smoothing | None = None  # SmoothQuant groups trained and shipped (smoothing.py)
    # the PTQ training started from: "learned", or "nearest" (asked, or measured better), and the
    # held-out error of each start measured
    start: str = "nearest"
    start_scores: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        eligible = [d for d in self.pruning if d.reason is None]
        return {
            "onnx": str(self.onnx_path),
            "report": str(self.report_path),
            "quantize": self.quantized.to_json(),
            "start": self.start,
            "start_scores": self.start_scores,
            "ptq_fidelity": self.ptq.to_json(),
            "qat_fidelity": self.qat.to_json(),
            "training": {k: v.to_json() for k, v in self.training.items()},
            "mapping": None if self.mapping is None else self.mapping.to_json(),
            "sparsity": None
            if not self.pruning
            else {
                "pattern": PATTERN,
                "pruned_layers": len(eligible),
                "pruned_weights": sum(d.params // 2 for d in eligible),
                "skipped": [{"module": d.module, "reason": d.reason} for d in self.pruning if d.reason],
            },
            "seconds": round(self.seconds, 1),
            "smooth_quant": None if self.smoothing is None else self.smoothing.report.to_json(),
        }


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrtbuildError(f"--device {device}: no CUDA device here", "use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise TrtbuildError(f"unknown --device '{device}'", "use auto, cpu or cuda[:N]")
    return torch.device(device)


def _load(source: str | nn.Module, weights: str | Path | None) -> tuple[nn.Module, str]:
    from export.sources import load_torch_model, load_weights, resolve_source

    if isinstance(source, nn.Module):
        if weights is not None:
            load_weights(source, weights)
        return source.eval(), type(source).__name__.lower()
    parsed = resolve_source(source)
    if parsed.kind != "python":
        raise TrtbuildError(
            f"QAT trains the PyTorch model; '{source}' is a {parsed.kind} file",
            "give module:attribute or file.py:attribute (with --weights for a state dict)",
        )
    model = load_torch_model(parsed, weights)
    if isinstance(model, torch.jit.ScriptModule):
        raise TrtbuildError("a TorchScript module cannot be fine-tuned here", "give the Python nn.Module")
    return model, parsed.name


def _export(
    model: nn.Module,
    inputs: Sequence[str],
    path: Path,
    names: Sequence[str] | None,
    opset: int | None,
    dynamic_batch: bool,
) -> onnx.ModelProto:
    from export.pipeline import export_model

    export_model(
        model.cpu().eval(), inputs, path, output_names=names, opset=opset, dynamic_batch=dynamic_batch
    )
    return load_model(path)


def _declared_inputs(inputs: Sequence[str], dynamic_batch: bool) -> list[ModelInput]:
    """The --input specs as calibration data sees model inputs (a static batch stays static)."""
    from export.pipeline import build_specs

    return [
        ModelInput(s.name, (None if 0 in s.dynamic_axes else 1, *s.opt_shape[1:]), np.dtype(s.dtype))
        for s in build_specs(inputs, dynamic_batch=dynamic_batch)
    ]


def _learned_ranges(ranges: RangeSet, quantizers: Mapping[str, ActivationQuantizer]) -> RangeSet:
    learned = RangeSet(method="qat-lsq", meta={"initial_method": ranges.method})
    for name, r in ranges.items():
        q = quantizers.get(name)
        learned.add(TensorRange(name, q.amax, r.min, r.max) if q is not None else r)
    return learned


def quantize_student(
    model: nn.Module,
    qmap: QuantMap,
    plan: QdqPlan,
    masks: Mapping[str, torch.Tensor],
    device: torch.device,
) -> tuple[QuantHooks, dict[str, ActivationQuantizer]]:
    """Fake-quantize ``model`` as ``plan`` places Q/DQ (mapped by ``qmap``); 2:4 ``masks`` stay applied."""
    quantizers = {t: ActivationQuantizer(t, plan.activations[t].scale * 127.0) for t in qmap.inputs}
    for q in quantizers.values():
        q.to(device)
    hooks = QuantHooks()
    modules = dict(model.named_modules())
    smooth = {m: torch.from_numpy(s).to(device) for m, s in qmap.scales.items()}  # SmoothQuant's s
    for tensor, users in qmap.inputs.items():
        if tensor in qmap.outputs:  # quantized where it is computed: its Add reader sees int8 too
            hooks.quantize_output(modules[qmap.outputs[tensor]], quantizers[tensor])
            continue
        for module_name in users:
            hooks.quantize_input(modules[module_name], quantizers[tensor], smooth.get(module_name))
    for module_name in qmap.weighted:
        wmask = masks.get(module_name)
        hooks.quantize_weight(
            modules[module_name], None if wmask is None else wmask.to(device), smooth.get(module_name)
        )
    for module_name, mask in masks.items():
        if module_name not in qmap.weighted:
            hooks.mask_weight(modules[module_name], mask.to(device))
    return hooks, quantizers


def qat(
    source: str | nn.Module,
    inputs: Sequence[str],
    data: Any,
    out_dir: str | Path,
    *,
    weights: str | Path | None = None,
    dynamic_batch: bool = False,
    sparsity: str | None = None,
    steps: int = 200,
    sparse_steps: int | None = None,
    sparse_lr: float = sparse_recipe.RECOVERY_LR,
    sparse_budget: float | None = sparse_recipe.DEFAULT_BUDGET,
    sparse_max_dense: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = 2e-6,
    step_lr: float = 2e-6,
    eval_every: int = 25,
    patience: int = 3,
    checkpoint_every: int = 50,
    resume: bool = False,
    holdout: int | None = QuantizeSettings.holdout,
    samples: int | None = None,
    min_fidelity: str | float | Sequence[str] | None = None,
    method: str = DEFAULT_METHOD,
    exclude: Sequence[str] = (),
    exclude_op_types: Sequence[str] = (),
    output_names: Sequence[str] | None = None,
    opset: int | None = None,
    preprocess: Preprocess | None = None,
    trt_version: str = DEFAULT_TRT_VERSION,
    seed: int = 0,
    device: str = "auto",
    start: str = "learned",
    smooth_quant: str = QuantizeSettings.smooth_quant,
    loss: str = "kl",
    temperature: float = 1.0,
    margin_term: str = margin_loss.DEFAULT_TERM,
    margin_weight: float = margin_loss.DEFAULT_WEIGHT,
    select: str = selection.DEFAULT_SELECTION,
    select_on: str = graph_score.DEFAULT_SELECT_ON,
    rounding_budget_s: float = QuantizeSettings.rounding_budget_s,
    augment: str = "off",
    schedule: str = "constant",
    loss_fn: LossFn | None = None,
    train_loader: Iterable[tuple[Any, Any]] | None = None,
    on_step: StepCallback | None = None,
) -> QatResult:
    """Fine-tune ``source`` for INT8 (and 2:4 with ``sparsity='2:4'``) and write quantize's artifacts.

    ``data``: unlabeled samples (anything :func:`calibrators.data.open_data` takes); ``holdout`` of them
    measure fidelity, the rest train. ``loss_fn(student_outputs, targets)`` replaces the distillation loss;
    with ``train_loader`` (``(inputs, labels)`` batches of tensors) the targets are the user's labels.
    ``sparse_steps``: FP32 recovery steps after pruning (default: ``steps``) at ``sparse_lr``;
    ``sparse_budget``: KL budget that keeps the most sensitive layers dense (None: prune all eligible);
    ``sparse_max_dense``: with it, at most this many weights stay dense (a size target; prune_select.py).
    ``start``: "learned" starts from learned-rounding PTQ (its integers and bias correction folded into
    the weights, ptq_start.py), "nearest" from round-to-nearest without bias correction. ``smooth_quant``:
    as `quantize` (auto: where MatMul inputs have outlier channels); the student trains the smoothed model
    (smoothing.py). ``augment``: "auto" trains QAT on fresh augmented views of an image model's training
    samples (qat_views.py), "off" on the fixed samples; ``schedule``: the QAT lr schedule (train.py).
    ``margin_term`` / ``margin_weight``: a top-1-aimed term added to the KL on logits (margin_loss.py);
    ``select``: how the best held-out QAT step is ranked ("kl", or "top1-kl": decisive top-1 first);
    ``select_on``: what is scored, the torch student ("student") or the Q/DQ graph it would ship as
    ("graph", graph_score.py: one export per evaluation).
    """
    from trtbuild.core.output_set import check_writable_folder

    began = time.perf_counter()
    if sparsity is not None and sparsity not in SPARSITY_PATTERNS:
        raise TrtbuildError(
            f"sparsity pattern '{sparsity}' is not one TensorRT's sparse kernels take",
            f"use --sparsity {PATTERN}",
        )
    sparse_recipe.check_max_dense(sparse_max_dense, sparse_budget)
    if augment not in AUGMENTS:
        raise TrtbuildError(f"unknown --augment '{augment}'", f"use one of {', '.join(AUGMENTS)}")
    if start not in STARTS:
        raise TrtbuildError(f"unknown QAT start '{start}'", f"use one of {', '.join(STARTS)}")
    if loss not in LOSSES or not temperature > 0:
        raise TrtbuildError(
            f"unknown QAT loss '{loss}' at temperature {temperature}",
            f"use one of {', '.join(LOSSES)} with a temperature > 0",
        )
    margin_loss.check(margin_term, margin_weight)
    config = TrainConfig(
        steps,
        batch_size,
        lr,
        step_lr,
        eval_every,
        patience,
        checkpoint_every,
        seed,
        schedule,
        select,
        select_on,
    )
    sparse_config = TrainConfig(
        sparse_steps or steps, batch_size, sparse_lr, step_lr, eval_every, patience, checkpoint_every, seed
    )
    out = Path(out_dir)
    check_writable_folder(out, "--out")
    dev = _device(device)
    torch.manual_seed(seed)
    model, name = _load(source, weights)
    if not weighted_modules(model):
        raise TrtbuildError(
            f"'{name}' has no Conv/Linear layer with weights to quantize",
            "QAT needs nn.Conv*/nn.Linear modules (quantize a graph of other ops with `trtbuild quantize`)",
        )
    decisions: list[PruneDecision] = plan_pruning(model) if sparsity is not None else []
    if sparsity is not None and not any(d.reason is None for d in decisions):
        reasons = "; ".join(f"{d.module}: {d.reason}" for d in decisions[:3])
        raise TrtbuildError(
            f"no layer of the model can take {PATTERN} sparsity ({reasons})", "drop --sparsity"
        )
    # The data is checked against the declared inputs before anything is exported or trained.
    all_data = open_data(data, _declared_inputs(inputs, dynamic_batch), preprocess)
    if holdout is None:
        holdout = gate_stats.auto_holdout(all_data.known_length(), samples)
    calib, held = all_data.split(holdout, seed)
    calib = calib.sample(samples, seed)
    train = [s for _, s in calib.samples()]
    declared = [i.name for i in _declared_inputs(inputs, dynamic_batch)]
    fit_batch = FIT_BATCH if sparsity is not None else None
    check_batch(model, train, declared, largest_batch(batch_size, fit_batch, len(train)))
    held_batches = list(held.batches(batch_size))
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    ckpt_dir = out / "checkpoints"
    run = _run_key(locals(), train)
    if resume and not ckpt_dir.is_dir():
        raise TrtbuildError(f"--resume: no checkpoints in {ckpt_dir}", "run without --resume first")
    if resume and not list(ckpt_dir.glob(f"{name}.*.ckpt")):
        # a folder of another model's checkpoints (the API names a module by its class, the CLI by its
        # attribute): resuming would silently start over
        others = sorted({p.name.split(".")[0] for p in ckpt_dir.glob("*.ckpt")})
        raise TrtbuildError(
            f"--resume: {ckpt_dir} has no checkpoint of '{name}' (it has {', '.join(others) or 'none'})",
            "resume from the SOURCE the checkpoints were written from, or run without --resume",
        )

    with tempfile.TemporaryDirectory(prefix="trtbuild-qat-") as tmp:
        onnx_path = Path(tmp) / f"{name}.onnx"
        graph = _export(model, inputs, onnx_path, output_names, opset, dynamic_batch)
        names_out = [o.name for o in graph.graph.output]
        if not quantizable_activations(graph, exclude, exclude_op_types):  # before any training
            _nothing_to_quantize(graph, exclude, exclude_op_types, name)
        input_names = [i.name for i in model_inputs(graph)]
        reference = fidelity.run_batches(fidelity.session(graph), held_batches)
        # Top-1 is judged as quantize's gate judges it: FP32 near-ties listed, not counted (near_ties.py).
        kinds = near_ties.attach(fidelity.decide_kinds(graph, reference), graph, reference, held_batches)
        if loss_fn is None and train_loader is None and loss == "kl":
            loss_fn = kind_loss(kinds, [o.name for o in graph.graph.output], temperature)
            loss_fn = margin_loss.with_margin(loss_fn, kinds, names_out, margin_term, margin_weight)
        teacher.to(dev)

        def stage(label: str) -> Callable[[int, int, float, Evaluation | None], None] | None:
            if on_step is None:
                return None
            return lambda *args: on_step(label, *args)

        def trainer(
            cfg: TrainConfig,
            extra: Sequence[nn.Parameter],
            label: str,
            recover: sparse_recipe.FeatureDistillation | AugmentedViews | None = None,
            scorer: graph_score.GraphScorer | None = None,
        ) -> Trainer:
            return Trainer(
                model.to(dev),
                teacher,
                extra,
                train,
                held_batches,
                input_names,
                names_out,
                kinds,
                cfg,
                dev,
                loss_fn if recover is None else recover.loss,
                train_loader if recover is None else recover,
                stage(label),
                scorer,
                run,
            )

        result_training: dict[str, TrainResult] = {}
        masks: dict[str, torch.Tensor] = {}
        if sparsity is not None:
            # One-shot data-aware 2:4 (prune_fit.py): magnitude masks alone leave EfficientNet-Lite0 at
            # ~0% top-1 agreement; re-fitted layers keep most of it before any training. BatchNorm keeps
            # its trained statistics (re-estimating them on the calibration crops measured worse).
            size = FIT_BATCH
            fit = train[:FIT_SAMPLES]
            feeds = [
                [torch.from_numpy(np.concatenate([t[n] for t in fit[i : i + size]])) for n in input_names]
                for i in range(0, len(fit), size)
            ]
            masks, decisions, _ = sparse_recipe.prune(
                model, teacher.cpu(), decisions, feeds, sparse_budget, max_dense=sparse_max_dense
            )
            teacher.to(dev)
            hooks = QuantHooks()
            modules = dict(model.named_modules())
            for module_name, mask in masks.items():
                hooks.mask_weight(modules[module_name], mask.to(dev))
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            recover = None
            if train_loader is None:  # augmented feature distillation (image inputs; else fixed samples)
                recover = sparse_recipe.recovery(
                    model.to(dev), teacher, train, input_names, masks,
                    loss_fn or distillation_loss, batch_size, seed,
                )  # fmt: skip
            result_training["sparse"] = trainer(sparse_config, [], "2:4 recovery", recover).fit(
                ckpt_dir / f"{name}.sparse.ckpt", resume
            )
            hooks.remove()
            if recover is not None:
                recover.remove()
            graph = _export(model, inputs, onnx_path, output_names, opset, dynamic_batch)

        options = QdqOptions(
            exclude_nodes=tuple(exclude), exclude_op_types=tuple(exclude_op_types), bias_correction=False
        )
        tensors = quantizable_activations(graph, exclude, exclude_op_types)
        graph, smoothing = smooth_graph(graph, calib.batches(batch_size), smooth_quant, set(tensors), seed)
        if smoothing is not None:  # a duplicated LayerNorm adds a tensor to quantize
            tensors = quantizable_activations(graph, exclude, exclude_op_types)
        collection = collect(
            graph, calib, tensors=tensors, batch_size=batch_size, seed=seed, show_progress=False
        )
        ranges = compute_ranges(collection, method)
        plan = plan_qdq(graph, ranges, options)

        def measured(candidate: QdqPlan) -> FidelityReport:
            test = fidelity.run_batches(fidelity.session(apply_qdq(graph, candidate)), held_batches)
            return fidelity.compare(reference, test, kinds=kinds)

        ptq = measured(plan)
        start_used, start_scores = "nearest", {"nearest": ptq.score()}
        if start == "learned":
            batches = calib.sample(32, seed).batches(batch_size)
            learned_start, _ = learned_plan(graph, ranges, options, batches, rounding_budget_s, seed)
            learned_ptq = measured(learned_start)
            start_scores["learned"] = learned_ptq.score()
            # As in `quantize`: learned rounding can end worse than nearest as a whole (MiniLM-L6,
            # docs/int8-accuracy.md), so the start is the one closer to FP32 on the held-out samples.
            if learned_ptq.score() <= ptq.score():
                plan, ptq, start_used = learned_start, learned_ptq, "learned"
            else:
                log.warning(
                    "learned-rounding start measured worse than round-to-nearest on %d held-out samples "
                    "(error %.4g vs %.4g); QAT starts from nearest",
                    ptq.samples,
                    learned_ptq.score(),
                    ptq.score(),
                )
        log.info("PTQ fidelity (%s ranges): %s", method, ptq.summary())

        scales = None if smoothing is None else smoothing.tensor_scales(plan)
        qmap = map_plan(model.cpu(), graph, plan, train[0], input_names, scales)
        if start_used == "learned":  # after the mapping: it matches the unchanged model's values
            fold_plan(model, graph, plan, qmap.weighted, qmap.scales)
        hooks, quantizers = quantize_student(model, qmap, plan, masks, dev)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        steps_params = [q.step for q in quantizers.values()]
        views = None
        if train_loader is None:  # fresh augmented views of the training samples (image inputs)
            views = augmented_views(
                augment, teacher, train, input_names, loss_fn or distillation_loss, batch_size, seed
            )

        def export_student(path: Path) -> None:  # as the final graph is written below
            with torch.no_grad():
                for module_name, mask in masks.items():
                    modules[module_name].weight.mul_(mask.to(modules[module_name].weight.device))
            exported = _export(model, inputs, path, output_names, opset, dynamic_batch)
            if smoothing is not None:
                onnx.save(smoothing.reapply(exported), str(path))
            model.to(dev)  # _export moved it to the CPU

        scorer = graph_score.GraphScorer(
            export_student,
            Path(tmp) / "step" / onnx_path.name,
            hooks,
            lambda: _learned_ranges(ranges, quantizers),
            options,
            held_batches,
            reference,
            kinds,
        )
        result_training["qat"] = trainer(config, steps_params, "QAT", views, scorer).fit(
            ckpt_dir / f"{name}.qat.ckpt", resume
        )
        hooks.remove()
        with torch.no_grad():
            for module_name, mask in masks.items():
                modules[module_name].weight.mul_(mask.to(modules[module_name].weight.device))

        learned = _learned_ranges(ranges, quantizers)
        graph = _export(model, inputs, onnx_path, output_names, opset, dynamic_batch)
        if smoothing is not None:  # the same s as trained; quantize must not smooth again
            onnx.save(smoothing.reapply(graph), str(onnx_path))
        quantized = quantize(
            onnx_path,
            all_data,
            out,
            holdout=holdout,
            samples=samples,
            min_fidelity=min_fidelity,
            exclude=exclude,
            exclude_op_types=exclude_op_types,
            trt_version=trt_version,
            bias_correction=False,
            batch_size=batch_size,
            seed=seed,
            show_progress=False,
            ranges=learned,
            smooth_quant="off",  # the graph is smoothed (or not) as trained; the ranges are its own
        )
        qat_test = fidelity.run_batches(fidelity.session(str(quantized.onnx_path)), held_batches)
        qat_report = fidelity.compare(reference, qat_test, kinds=kinds)
        log.info("QAT fidelity vs the original FP32: %s", qat_report.summary())
        final_onnx = atomic.write_bytes(out / onnx_path.name, onnx_path.read_bytes())
        sidecar = onnx_path.with_suffix(".export.json")
        if sidecar.is_file():
            atomic.write_bytes(out / sidecar.name, sidecar.read_bytes())
    result = QatResult(
        onnx_path=final_onnx,
        quantized=quantized,
        report_path=out / f"{name}.qat.json",
        ptq=ptq,
        qat=qat_report,
        training=result_training,
        mapping=qmap,
        pruning=decisions,
        seconds=time.perf_counter() - began,
        smoothing=smoothing,
        start=start_used,
        start_scores=start_scores,
    )
    atomic.write_text(result.report_path, json.dumps(result.to_json(), indent=2, default=_plain) + "\n")
    return result


def _nothing_to_quantize(
    graph: onnx.ModelProto, exclude: Sequence[str], exclude_op_types: Sequence[str], name: str
) -> None:
    """Say why no layer gets Q/DQ (the placement's own reasons): with a static batch of 1 every Gemm is a
    GEMV kept float, so a plain MLP exported without --dynamic-batch had only "no quantizable activations"."""
    from calibrators.qdq import ensure_node_names, select_qdq

    options = QdqOptions(exclude_nodes=tuple(exclude), exclude_op_types=tuple(exclude_op_types))
    kept = select_qdq(ensure_node_names(graph), options).excluded
    reasons = "; ".join(f"{e.node}: {e.reason}" for e in kept[:3]) or "no Conv/Gemm/MatMul in the graph"
    hint = "INT8 does not apply: build it in FP16/FP32"
    if any("GEMV" in e.reason for e in kept):
        hint = "give --dynamic-batch (a batch-1 Gemm/MatMul runs as a GEMV, kept float), or build FP16/FP32"
    raise TrtbuildError(f"no layer of '{name}' would be quantized ({reasons})", hint)


RUN_OPTIONS = (
    "inputs", "dynamic_batch", "sparsity", "sparse_budget", "sparse_max_dense", "holdout", "samples",
    "method", "exclude", "exclude_op_types", "output_names", "opset", "start", "smooth_quant", "loss",
    "temperature", "margin_term", "margin_weight", "augment", "weights",
)  # fmt: skip


def _run_key(options: Mapping[str, Any], train: Sequence[Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """The options a checkpoint must share to be resumed (train.Trainer checks it), and which data: the
    training samples' count and a hash of the first and last (cheap; a different --data changes them)."""
    key: dict[str, Any] = {
        k: list(v) if isinstance(v, (list, tuple)) else None if v is None else str(v)
        for k, v in ((k, options[k]) for k in RUN_OPTIONS)
    }
    key["own_loss"] = options["loss_fn"] is not None
    key["labeled"] = options["train_loader"] is not None
    digest = hashlib.sha256()
    for sample in (train[0], train[-1]) if train else ():
        for name in sorted(sample):
            digest.update(np.ascontiguousarray(sample[name]).tobytes())
    key["data"] = [len(train), digest.hexdigest()]
    return key


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)

"""Block reconstruction (BRECQ: Li et al., "BRECQ: Pushing the Limit of Post-Training Quantization by Block
Reconstruction", ICLR 2021) with learned activation step sizes (LSQ, calibrators/act_step.py).

Layer-wise learned rounding (calibrators/adaround.py) fits each layer's weights, one layer at a time; the
error it leaves on EfficientNet-Lite0 is mostly the activations' (INT8 activations alone: cosine 0.9980,
learned weights alone: 0.9984), which weight rounding per layer cannot reach. Per block (an MBConv block:
the graph between two single-tensor cuts, ending where no activation function follows) this learns
jointly the rounding of the block's int8 weights (warm-started from the layer-wise choice) and the step of
every activation Q/DQ inside it (its input Q/DQ included), to the block's FP32 output from its input in
the quantized prefix (x_q -> block_q vs x_fp -> block_fp: each block also undoes its input's error).

Cheap by construction: the block runs the written Q/DQ graph's own nodes in torch (calibrators/onnx_torch
ops; Q/DQ as straight-through fake quantization), on random spatial crops of a few images per step (a few
hundred steps, float32, one thread); the prefix is carried forward block by block on full maps (one float
and one quantized pass in all). A block keeps what it learned only where its full-map output error on
calibration images it was not fitted on is lower than at the start. Deterministic for a seed.

Measured on top of the default learned rounding (bench/bench_int8_accuracy.py ``--learned block``,
docs/int8-accuracy.md): not better on held-out top-1 or cosine, and over the 2-minute budget, so it is
not a ``--rounding`` option; the bench row runs it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from calibrators import act_step, onnx_torch, rounding_grid
from calibrators.data import first_samples
from calibrators.graph_index import GraphIndex
from calibrators.qdq_rewrite import apply_qdq
from calibrators.qdq_scales import GraphCache, plan_qdq
from calibrators.qdq_types import QdqOptions, QdqPlan
from calibrators.ranges import RangeSet

log = logging.getLogger(__name__)

clock = time.process_time  # CPU seconds of this process, as adaround's budget
_ZETA, _GAMMA = 1.1, -0.1  # AdaRound's rectified sigmoid
# Elementwise activation functions: a block never ends right before or after one (the conv it follows and
# the activation belong together).
_ACTIVATIONS = {"Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "LeakyRelu", "Elu", "Mul"}


@dataclass(frozen=True)
class BlockConfig:
    """How hard to learn. Defaults: measured on EfficientNet-Lite0 (bench/bench_int8_accuracy.py)."""

    samples: int = 64  # calibration samples (the first ones, as learned rounding takes them)
    check: int = 16  # of those, images not fitted on that decide learned vs the start, per block
    iterations: int = 80  # Adam steps per block
    batch: int = 8  # images per step
    crop: int = 48  # square window of the block input per step (whole map when smaller)
    lr_step: float = 1e-2  # on log(step size)
    lr_round: float = 2e-2  # on the rounding variables
    weights: bool = True  # also learn the block's weight rounding (else steps only)
    reg_weight: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    start_h: float = 0.9  # the layer-wise choice's soft value at the start (1 - it for the other side)
    # learn only the k blocks with the largest own error at the start (None: every block); every block of
    # EfficientNet-Lite0 at 100 steps took 163 CPU s and measured no better (docs/int8-accuracy.md)
    worst: int | None = 6
    budget_s: float = 60.0  # CPU seconds; the blocks left keep the layer-wise result
    seed: int = 0


@dataclass
class BlockReport:
    end: str  # the block's output tensor
    weights: list[str]
    steps: list[str]
    error_before: float  # relative output MSE on the check images
    error_after: float
    kept: bool
    seconds: float


@dataclass
class BlockResult:
    scales: dict[str, float] = field(default_factory=dict)  # activation tensor -> learned step (int8)
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # weight -> int8 (ONNX layout)
    blocks: list[BlockReport] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # blocks left for time, or not among the worst
    seconds: float = 0.0  # CPU seconds
    unsupported: str | None = None  # why nothing was learned (an op the torch evaluator lacks)

    def to_json(self) -> dict[str, Any]:
        return {
            "learned_steps": {k: float(np.float32(v)) for k, v in sorted(self.scales.items())},
            "weights": sorted(self.weights),
            "skipped": list(self.skipped),
            "cpu_seconds": round(self.seconds, 2),
            "unsupported": self.unsupported,
            "blocks": [
                {
                    "end": b.end,
                    "weights": len(b.weights),
                    "steps": len(b.steps),
                    "error_before": b.error_before,
                    "error_after": b.error_after,
                    "kept": b.kept,
                    "seconds": round(b.seconds, 2),
                }
                for b in self.blocks
            ],
        }


@dataclass
class Block:
    start: str
    end: str
    qnodes: list[onnx.NodeProto]  # in the Q/DQ graph (with the weight DequantizeLinear nodes)
    fnodes: list[onnx.NodeProto]  # in the float graph
    steps: dict[str, str]  # scale initializer -> activation tensor (learnable steps)
    weights: dict[str, str]  # int8 weight initializer -> weight name in the plan


def reconstruct(
    model: onnx.ModelProto | GraphCache,
    ranges: RangeSet,
    options: QdqOptions,
    batches: Iterable[Mapping[str, np.ndarray]],
    config: BlockConfig | None = None,
) -> BlockResult:
    """Learn steps and rounding block by block on the graph ``plan_qdq(model, ranges, options)`` gives
    (int8 activations; ``options.learned_rounding`` the warm start). Apply the result with
    :func:`act_step.with_scales` on ``ranges`` and ``result.weights`` merged into the learned rounding."""
    import torch

    config = config or BlockConfig()
    start = clock()
    cache = model if isinstance(model, GraphCache) else GraphCache(model)
    result = BlockResult()
    if options.activation_type != "int8":
        result.unsupported = f"{options.activation_type} activations (int8 only)"
        return result
    plan = plan_qdq(cache, ranges, options)
    qmodel = apply_qdq(cache, plan, check=False)
    feeds = first_samples(batches, config.samples)
    try:
        blocks = find_blocks(cache.model, qmodel, plan)
    except onnx_torch.Unsupported as exc:
        result.unsupported = str(exc)
        log.warning("block reconstruction skipped: %s", exc)
        return result
    if not blocks or not feeds:
        return result
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic, and these ops are small (as calibrators/adaround.py)
    try:
        _run(cache.model, qmodel, blocks, feeds, config, result, start)
    finally:
        torch.set_num_threads(threads)
    result.seconds = clock() - start
    return result


def find_blocks(model: onnx.ModelProto, qmodel: onnx.ModelProto, plan: QdqPlan) -> list[Block]:
    """The graph cut into blocks at tensors that alone carry everything later nodes read (single-tensor
    cuts of the Q/DQ graph that the float graph has too), a block ending only where no activation function
    precedes or follows the cut."""
    onnx_torch.check_supported(model)  # the float graph; Q/DQ nodes are run here
    if len([i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]) != 1:
        raise onnx_torch.Unsupported("a graph with more than one input")
    if static_batch(model) not in (None, 1):  # batch 1 runs sample by sample; others would need padding
        raise onnx_torch.Unsupported(f"a fixed batch of {static_batch(model)}")
    fg = GraphIndex(model)
    consts = _constant_tensors(qmodel) | shape_tensors(qmodel)
    nodes = list(qmodel.graph.node)
    last: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for t in n.input:
            if t and t not in consts:
                last[t] = i
    outputs = {o.name for o in qmodel.graph.output}
    inputs = [i.name for i in qmodel.graph.input if i.name not in consts]
    live = set(inputs)
    cuts = [inputs[0]]
    for i, n in enumerate(nodes):
        live |= {o for o in n.output if o and o not in consts}
        live = {t for t in live if t in outputs or last.get(t, -1) > i}
        if len(live) == 1:
            t = next(iter(live))
            if t != cuts[-1] and (t in fg.producer) and (t in outputs or _block_end(fg, t)):
                cuts.append(t)
    if cuts[-1] not in outputs:
        cuts.append(next(o.name for o in qmodel.graph.output))
    qg = GraphIndex(qmodel)
    group_sizes: dict[str, int] = {}
    for a in plan.activations.values():
        group_sizes[a.group] = group_sizes.get(a.group, 0) + 1
    step_inits = {
        f"{key}_scale": key
        for key, a in plan.activations.items()
        if "@" not in key and a.dtype == "int8" and group_sizes[a.group] == 1
    }
    weight_inits = {
        f"{key.replace('@', '_')}_quantized": key
        for key, w in plan.weights.items()
        if w.weight_format == "int8" and len(w.consumers) == 1 and key in plan.rounded_weights
    }  # the layer-wise learned ones (the others may carry a bias correction that assumes nearest)
    blocks = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        qnodes = _between(qg, a, b)
        reads = {t for n in qnodes for t in n.input}
        blocks.append(
            Block(
                a,
                b,
                qnodes,
                _between(fg, a, b),
                {s: t for s, t in step_inits.items() if s in reads},
                {w: k for w, k in weight_inits.items() if w in reads},
            )
        )
    return blocks


def static_batch(model: onnx.ModelProto) -> int | None:
    """The input's fixed batch size (None: dynamic or unnamed)."""
    inits = {t.name for t in model.graph.initializer}
    dims = next(i for i in model.graph.input if i.name not in inits).type.tensor_type.shape.dim
    fixed = bool(dims) and dims[0].HasField("dim_value") and dims[0].dim_value > 0
    return int(dims[0].dim_value) if fixed else None


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _block_end(g: GraphIndex, t: str) -> bool:
    producer = g.producer[t].op_type
    consumers = {n.op_type for n, _ in g.consumers.get(t, [])}
    # a Pad belongs to the conv after it
    return producer not in _ACTIVATIONS | {"Pad"} and not (consumers & _ACTIVATIONS)


def shape_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors computed from Shape outputs (and constants) alone: the TorchScript export's "same"-padding
    arithmetic reads the input's rank from the start to the end of the graph. Their values are given to
    every block (calibrators/block_recon.py checks they do not change with the input size)."""
    consts = _constant_tensors(model)
    out: set[str] = set()
    for n in model.graph.node:
        reads = [t for t in n.input if t and t not in consts]
        if n.op_type == "Shape" or (reads and all(t in out for t in reads)):
            out |= {o for o in n.output if o}
    return out


def _constant_tensors(model: onnx.ModelProto) -> set[str]:
    """Initializers and what nodes compute from them alone (weight DequantizeLinear, Constant)."""
    consts = {i.name for i in model.graph.initializer}
    for n in model.graph.node:
        if all(not t or t in consts for t in n.input):
            consts |= {o for o in n.output if o}
    return consts


def _between(g: GraphIndex, start: str, end: str) -> list[onnx.NodeProto]:
    """The nodes (graph order) downstream of ``start`` that ``end`` needs, with the constant nodes they
    read; what else they read (shape arithmetic on the network input) is given to the evaluator."""
    down: set[str] = {start}
    for n in g.nodes:
        if any(t in down for t in n.input):
            down |= set(n.output)
    needed: set[int] = set()
    stack, seen = [end], {start}
    while stack:
        t = stack.pop()
        if t in seen or t not in g.producer:
            continue
        seen.add(t)
        node = g.producer[t]
        if not (set(node.output) & down) and any(i and i not in g.initializers for i in node.input):
            continue  # computed before the block from the network input: given
        needed.add(id(node))
        stack.extend(i for i in node.input if i)
    return [n for n in g.nodes if id(n) in needed]


class _Evaluator:
    """Runs a block's nodes in torch; Q/DQ as fake quantization with the current steps and rounding."""

    def __init__(self, model: onnx.ModelProto, nodes: Sequence[onnx.NodeProto], meta: _Meta) -> None:
        import torch

        self.nodes = list(nodes)
        reads = {t for n in nodes for t in n.input}
        self.consts = {
            i.name: torch.from_numpy(np.array(numpy_helper.to_array(i)))
            for i in model.graph.initializer
            if i.name in reads
        }
        self.meta = meta
        self.attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in nodes]

    def __call__(self, x: Any, start: str, steps: Mapping[str, Any], weights: Mapping[str, Any]) -> Any:
        import torch

        if self.meta.batch == 1 and x.shape[0] > 1:
            # a fixed batch of 1 (a Reshape to [1, ...] in the graph): one sample at a time
            return torch.cat([self(x[i : i + 1], start, steps, weights) for i in range(x.shape[0])])
        values: dict[str, Any] = {**self.consts, **self.meta(int(x.shape[0])), start: x}
        out = None
        for node, attrs in zip(self.nodes, self.attrs, strict=True):
            ins: list[Any] = [values[i] if i else None for i in node.input]
            if node.op_type == "QuantizeLinear":
                scale = steps.get(node.input[1], ins[1])
                q = torch.clamp(ins[0] / scale, act_step.QMIN, act_step.QMAX)
                out = q + (torch.round(q) - q).detach()
            elif node.op_type == "DequantizeLinear":
                q = weights[node.input[0]] if node.input[0] in weights else ins[0].float()
                scale = steps.get(node.input[1], ins[1])
                if scale.dim() == 1 and q.dim() > 1:
                    axis = int(attrs.get("axis", 1)) % q.dim()
                    scale = scale.reshape([-1 if d == axis else 1 for d in range(q.dim())])
                out = q * scale
            else:
                out = onnx_torch.OPS[node.op_type](ins, attrs)
            values[node.output[0]] = out
        return out


class _Params:
    """One block's learnable steps (log) and rounding variables, warm-started from the graph's values."""

    def __init__(self, block: Block, qmodel: onnx.ModelProto) -> None:
        import torch

        self.inits = {i.name: i for i in qmodel.graph.initializer}
        self.log_steps = {
            s: torch.tensor(math.log(float(numpy_helper.to_array(self.inits[s]))), requires_grad=True)
            for s in block.steps
        }
        self.v: dict[str, Any] = {}
        self.lo: dict[str, Any] = {}
        self.gap: dict[str, Any] = {}  # hi - lo: 1, or 0 where the float weight sits on a grid value

    def init_rounding(self, block: Block, float_w: Mapping[str, np.ndarray], config: BlockConfig) -> None:
        """Rounding variables between floor(w/s) and floor(w/s) + 1, starting at the graph's integers (the
        layer-wise choice) at soft value ``config.start_h``."""
        import torch

        axes = {n.input[0]: int(_attr(n, "axis", 1)) for n in block.qnodes if n.op_type == "DequantizeLinear"}
        for init, key in block.weights.items():
            q = numpy_helper.to_array(self.inits[init]).astype(np.float32)
            s = numpy_helper.to_array(self.inits[init[: -len("_quantized")] + "_scale"]).astype(np.float32)
            axis = axes[init] % q.ndim
            s = s.reshape([-1 if d == axis else 1 for d in range(q.ndim)])
            lo, hi = rounding_grid.neighbours(np.asarray(float_w[key], np.float32) / s, "int8")
            up = (q >= hi) & (hi > lo)  # where the start took the upper neighbour
            p = np.where(up, config.start_h, 1 - config.start_h)
            sig = (p - _GAMMA) / (_ZETA - _GAMMA)
            self.v[init] = torch.from_numpy(np.log(sig / (1 - sig)).astype(np.float32)).requires_grad_(True)
            self.lo[init] = torch.from_numpy(lo)
            self.gap[init] = torch.from_numpy(hi - lo)

    def soft(self, w: str) -> Any:
        import torch

        h = torch.clamp(torch.sigmoid(self.v[w]) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)
        return self.lo[w] + h * self.gap[w]

    def hard(self, w: str) -> Any:
        h = (self.v[w] >= 0).float()  # soft h >= 0.5 exactly where V >= 0
        return self.lo[w] + h * self.gap[w]

    def regulariser(self, beta: float) -> Any:
        import torch

        total = torch.zeros(())
        for v in self.v.values():
            h = torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)
            total = total + (1 - (2 * h - 1).abs().pow(beta)).mean()
        return total

    def steps(self) -> dict[str, Any]:
        return {s: v.exp() for s, v in self.log_steps.items()}

    def tensors(self) -> list[Any]:
        return [*self.log_steps.values(), *self.v.values()]


def _run(
    model: onnx.ModelProto,
    qmodel: onnx.ModelProto,
    blocks: Sequence[Block],
    feeds: Sequence[Mapping[str, np.ndarray]],
    config: BlockConfig,
    result: BlockResult,
    start: float,
) -> None:
    import torch

    name = next(iter(feeds[0]))
    x = torch.from_numpy(np.concatenate([np.asarray(b[name], np.float32) for b in feeds]))
    n = x.shape[0]
    check = min(config.check, n // 4)
    fit = n - check
    x_fp, x_q = x, x
    gen = torch.Generator().manual_seed(config.seed)
    meta = _Meta(model, blocks, x)
    crop = config.crop if meta.fixed else 1 << 30  # shape arithmetic that follows the size: whole maps only
    chosen = _worst(model, qmodel, blocks, x, fit, config, meta) if config.worst else None
    float_w = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for index, block in enumerate(blocks):
        fblock, qblock = _Evaluator(model, block.fnodes, meta), _Evaluator(qmodel, block.qnodes, meta)
        learnable = bool(block.steps or (config.weights and block.weights))
        if learnable and chosen is not None and index not in chosen:
            result.skipped.append(block.end)
            learnable = False
        if learnable and result.blocks and clock() - start > config.budget_s:
            result.skipped += [b.end for b in blocks[index:] if b.steps or b.weights]
            log.warning("block reconstruction ran out of its %.0f CPU s budget", config.budget_s)
            break  # no block after this one learns: the prefix need not be carried further
        params = _Params(block, qmodel)
        if learnable:
            if config.weights:
                params.init_rounding(block, float_w, config)
            _learn_block(block, fblock, qblock, params, x_fp, x_q, fit, config, gen, result, crop)
        with torch.no_grad():
            steps = params.steps()
            hard = {w: params.hard(w) for w in params.v}
            x_q = _batched(qblock, x_q, block.start, steps, hard)
            x_fp = _batched(fblock, x_fp, block.start, {}, {})


class _Meta:
    """The tensors blocks read from before them: shape arithmetic on the network input (its rank; its
    batch size for the final Reshape), computed per batch size from a zero input of the full size (these
    nodes read only its shape). ``fixed``: the same for another image size, so blocks may run on crops."""

    def __init__(self, model: onnx.ModelProto, blocks: Sequence[Block], x: Any) -> None:
        names = _external(model, blocks)
        g = GraphIndex(model)
        needed: set[int] = set()
        stack = list(names)
        while stack:
            node = g.producer.get(stack.pop())
            if node is not None and id(node) not in needed:
                needed.add(id(node))
                stack.extend(i for i in node.input if i)
        self.model = model
        self.names = sorted(names)
        self.nodes = [n for n in g.nodes if id(n) in needed]
        self.input = next(i.name for i in model.graph.input)
        self.batch = static_batch(model)  # 1 or None: find_blocks refuses other fixed batches
        self.shape = tuple(int(d) for d in x.shape[1:])
        self.cache: dict[tuple[int, ...], dict[str, Any]] = {}
        h, w = self.shape[-2:]
        b = self.batch or 2
        full, other = (
            self.values((b, *self.shape)),
            self.values((b, *self.shape[:-2], h - h // 8, w - w // 8)),
        )
        self.fixed = all(full[t].shape == other[t].shape and bool((full[t] == other[t]).all()) for t in names)

    def values(self, shape: tuple[int, ...]) -> dict[str, Any]:
        import torch

        if shape not in self.cache:
            sub = helper.make_model(
                helper.make_graph(
                    self.nodes,
                    "meta",
                    [helper.make_tensor_value_info(self.input, onnx.TensorProto.FLOAT, None)],
                    [helper.make_empty_tensor_value_info(t) for t in self.names],
                    list(self.model.graph.initializer),
                ),
                opset_imports=self.model.opset_import,
            )
            self.cache[shape] = onnx_torch.run(sub, {self.input: torch.zeros(shape)})
        return self.cache[shape]

    def __call__(self, batch: int) -> dict[str, Any]:
        return self.values((batch, *self.shape))


def _external(model: onnx.ModelProto, blocks: Sequence[Block]) -> set[str]:
    """Non-constant tensors the blocks read but do not compute (besides their input)."""
    inits = {i.name for i in model.graph.initializer}
    out: set[str] = set()
    for b in blocks:
        for nodes in (b.fnodes, b.qnodes):
            made = {o for n in nodes for o in n.output} | {b.start}
            out |= {t for n in nodes for t in n.input if t and t not in made and t not in inits}
    return out & {o for n in model.graph.node for o in n.output}


def _batched(
    ev: _Evaluator, x: Any, start: str, steps: Mapping[str, Any], weights: Mapping[str, Any], size: int = 16
) -> Any:
    import torch

    return torch.cat([ev(x[i : i + size], start, steps, weights) for i in range(0, x.shape[0], size)])


def _crop(x: Any, y0: int, x0: int, size: int) -> Any:
    return x[:, :, y0 : y0 + size, x0 : x0 + size] if x.dim() == 4 else x


def _learn_block(
    block: Block,
    fblock: _Evaluator,
    qblock: _Evaluator,
    params: _Params,
    x_fp: Any,
    x_q: Any,
    fit: int,
    config: BlockConfig,
    gen: Any,
    result: BlockResult,
    crop: int,
) -> None:
    import torch

    t0 = clock()
    with torch.no_grad():
        target_check = fblock(x_fp[fit:], block.start, {}, {})
        denom = float((target_check**2).mean()) or 1.0

        def check_error() -> float:
            hard = {w: params.hard(w) for w in params.v}
            out = qblock(x_q[fit:], block.start, params.steps(), hard)
            return float(((out - target_check) ** 2).mean()) / denom

        before = check_error()
        saved = {k: v.detach().clone() for k, v in {**params.log_steps, **params.v}.items()}
    groups = [{"params": list(params.log_steps.values()), "lr": config.lr_step}]
    if params.v:
        groups.append({"params": list(params.v.values()), "lr": config.lr_round})
    opt = torch.optim.Adam(groups)
    size = x_q.shape[-1] if x_q.dim() == 4 else 0
    crop = min(crop, size)
    warm = int(0.2 * config.iterations)
    for step in range(config.iterations):
        pick = torch.randperm(fit, generator=gen)[: config.batch]
        y0 = x0 = 0
        if x_q.dim() == 4 and size > crop:
            cells = (size - crop) // 4 + 1
            y0 = 4 * int(torch.randint(cells, (1,), generator=gen))
            x0 = 4 * int(torch.randint(cells, (1,), generator=gen))
        xq, xf = _crop(x_q[pick], y0, x0, crop), _crop(x_fp[pick], y0, x0, crop)
        with torch.no_grad():
            target = fblock(xf, block.start, {}, {})
        soft = {w: params.soft(w) for w in params.v}
        out = qblock(xq, block.start, params.steps(), soft)
        loss = ((out - target) ** 2).mean() / denom
        if params.v and step >= warm:
            frac = (step - warm) / max(1, config.iterations - warm)
            beta = config.beta[1] + 0.5 * (config.beta[0] - config.beta[1]) * (1 + math.cos(math.pi * frac))
            loss = loss + config.reg_weight * params.regulariser(beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in (0, config.iterations - 1):
            log.debug("block %s step %d: loss %.4g", block.end, step, loss.item())
    with torch.no_grad():
        after = check_error()
        kept = after < before
        if kept:
            for s, v in params.log_steps.items():
                result.scales[block.steps[s]] = float(np.float32(math.exp(float(v))))
            for w, key in block.weights.items():
                if w in params.v:
                    result.weights[key] = params.hard(w).numpy().astype(np.int8)
        else:  # back to the start: the next blocks are fitted on what the graph will carry
            for k, v in {**params.log_steps, **params.v}.items():
                v.copy_(saved[k])
    result.blocks.append(
        BlockReport(
            block.end,
            sorted(block.weights.values()),
            sorted(block.steps.values()),
            before,
            after,
            kept,
            clock() - t0,
        )
    )
    log.info(
        "block %s: output error %.4g -> %.4g%s", block.end, before, after, "" if kept else " (kept start)"
    )


def _worst(
    model: onnx.ModelProto,
    qmodel: onnx.ModelProto,
    blocks: Sequence[Block],
    x: Any,
    fit: int,
    config: BlockConfig,
    meta: _Meta,
) -> set[int]:
    """The indices of the ``config.worst`` blocks with the largest own error at the start (each on its
    quantized input, against its float output from the float input), on the check images."""
    import torch

    errors: list[tuple[float, int]] = []
    x_fp = x_q = x[fit:]
    with torch.no_grad():
        for i, block in enumerate(blocks):
            fblock, qblock = _Evaluator(model, block.fnodes, meta), _Evaluator(qmodel, block.qnodes, meta)
            y_fp = fblock(x_fp, block.start, {}, {})
            y_q = qblock(x_q, block.start, {}, {})
            if block.steps or block.weights:
                err = float(((y_q - y_fp) ** 2).mean()) / (float((y_fp**2).mean()) or 1.0)
                errors.append((err, i))
            x_fp, x_q = y_fp, y_q
    return {i for _, i in sorted(errors, reverse=True)[: config.worst]}


def options_after(options: QdqOptions, result: BlockResult) -> QdqOptions:
    """``options`` with the block-learned integers over the layer-wise ones."""
    from dataclasses import replace

    return replace(options, learned_rounding={**(options.learned_rounding or {}), **result.weights})

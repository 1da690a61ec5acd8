"""ONNX Runtime runner: CPU here; CUDA or TensorRT execution providers where onnxruntime-gpu has them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from trtbuild.core.errors import TrtbuildError
from trtbuild.harness.runner import Feed, IterationTiming, Runner, RunnerTensor

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


class OrtRunner(Runner):
    """Times ``session.run`` with the host clock: with a GPU provider that includes its own copies."""

    runtime = "ort"

    def __init__(
        self, model: str | Path, provider: str = "cpu", threads: int | None = None, name: str | None = None
    ) -> None:
        super().__init__(name or Path(model).name)
        if provider not in PROVIDERS:
            raise TrtbuildError(
                f"unknown ONNX Runtime provider '{provider}'", f"choose one of: {', '.join(PROVIDERS)}"
            )
        self.model = Path(model)
        self.provider = provider
        self.device = "cpu" if provider == "cpu" else "cuda"
        self.threads = threads
        self.session: Any = None

    def activate(self) -> None:
        import onnxruntime as ort

        wanted = PROVIDERS[self.provider][0]
        if wanted not in ort.get_available_providers():
            raise TrtbuildError(
                f"ONNX Runtime here has no {wanted} (available: {', '.join(ort.get_available_providers())})",
                "install onnxruntime-gpu on a CUDA machine, or profile with the CPU provider",
            )
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: ORT's graph-cleanup warnings flood the terminal
        try:
            self.session = ort.InferenceSession(str(self.model), options, providers=PROVIDERS[self.provider])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise TrtbuildError(
                f"ONNX Runtime cannot load {self.model}: {str(exc).splitlines()[0]}",
                "check the file is a valid ONNX model (trtbuild export writes one)",
            ) from exc

    def input_info(self) -> list[RunnerTensor]:
        return [
            RunnerTensor(i.name, np.dtype(_ORT_TYPES.get(i.type, np.float32)), tuple(i.shape))
            for i in self.session.get_inputs()
        ]

    def infer(self, feed: Feed) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self._run(names, feed), strict=True))

    def timed_iteration(self, feed: Feed) -> IterationTiming:
        start = time.perf_counter_ns()
        self._run(None, feed)
        return IterationTiming(total_ms=(time.perf_counter_ns() - start) / 1e6)

    def _run(self, names: list[str] | None, feed: Feed) -> Any:
        try:
            return self.session.run(names, feed)
        except Exception as exc:  # ORT's InvalidArgument/Fail: the feed does not fit the model
            shown = ", ".join(
                f"{k} {'x'.join(map(str, v.shape)) or 'scalar'} {v.dtype}" for k, v in feed.items()
            )
            raise TrtbuildError(
                f"ONNX Runtime cannot run the model on the profiling input ({shown}): "
                f"{(str(exc).strip().splitlines() or [''])[0][:200]}",
                "pass real inputs with --data (an .npz named by input, shaped as the model takes them)",
            ) from exc

    def deactivate(self) -> None:
        self.session = None

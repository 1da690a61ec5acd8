"""Export time on EfficientNet-Lite0: torch's two exporters bare, and trtbuild's whole export pipeline.

All in one process on the same model and threads, side by side:
  - `torch.onnx.export(dynamo=True)` bare (what torch 2.13 recommends; writes opset 18),
  - `torch.onnx.export(dynamo=False)` bare (the legacy TorchScript exporter, opset 17),
  - `export.pipeline.export_model` (dynamo export + opset 17 conversion + onnxslim preparation +
    ORT-vs-PyTorch verification on random inputs and real photos + sidecar).
Each graph is then run in ONNX Runtime on the same real photos and compared with PyTorch.

    python3 bench/bench_export.py [--repeats 2] [--photos 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--photos", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import onnx
    import onnxruntime as ort
    import torch

    from export.pipeline import export_model
    from trtbuild import examples

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    model = examples.efficientnet_lite0()
    photos = examples.normalize_imagenet(examples.photo_crops(args.photos, seed=1))
    with torch.no_grad():
        want = model(torch.from_numpy(photos)).numpy()
    example = (torch.zeros(1, 3, 224, 224),)
    batch = torch.export.Dim("batch", min=1, max=32)

    def dynamo(path: Path) -> None:
        program = torch.onnx.export(
            model,
            example,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            opset_version=18,
            dynamo=True,
        )
        assert program is not None
        program.save(str(path))

    def torchscript(path: Path) -> None:
        torch.onnx.export(
            model,
            example,
            str(path),
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )

    def trtbuild(path: Path) -> None:
        export_model(
            model,
            ["images:1x3x224x224"],
            path,
            dynamic_batch=True,
            output_names=["logits"],
            verify_inputs=photos,
        )

    rows: list[tuple[str, float, int, int, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, fn in (
            ("torch dynamo (bare)", dynamo),
            ("torch TorchScript (bare)", torchscript),
            ("trtbuild export_model (export+prepare+verify)", trtbuild),
        ):
            times = []
            path = Path(tmp) / f"{len(rows)}.onnx"
            for _ in range(args.repeats):
                start = time.perf_counter()
                fn(path)
                times.append(time.perf_counter() - start)
            graph = onnx.load(str(path))
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            got = session.run(None, {"images": photos})[0]
            opset = next(o.version for o in graph.opset_import if o.domain == "")
            rows.append(
                (
                    label,
                    min(times),
                    opset,
                    len(graph.graph.node),
                    float(np.abs(got - want).max()),
                    float((got.argmax(1) == want.argmax(1)).mean()),
                )
            )

    base = rows[0][1]
    print(f"EfficientNet-Lite0, {args.photos} real photos, {args.threads} threads, best of {args.repeats}")
    head = ("path", "seconds", "vs dynamo", "opset", "nodes", "max abs err", "top1 agree")
    print(f"{head[0]:48} " + " ".join(f"{h:>11}" for h in head[1:]))
    for label, seconds, opset, nodes, err, agree in rows:
        cells = (
            f"{seconds:.2f}",
            f"{seconds / base:.2f}x",
            str(opset),
            str(nodes),
            f"{err:.2e}",
            f"{agree:.2f}",
        )
        print(f"{label:48} " + " ".join(f"{c:>11}" for c in cells))


if __name__ == "__main__":
    main()

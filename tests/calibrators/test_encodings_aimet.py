"""Our AIMET encodings read by an independent consumer: aimet-onnx's ``encodings_to_onnx_qdq``.

aimet-onnx pins torch/torchvision versions that would replace ours, so it lives in its own virtual
environment (``.venv-aimet``, created with --system-site-packages and a constraints file that keeps our
torch/numpy/onnx/onnxruntime) and is driven through a subprocess. ``TRTBUILD_AIMET_PYTHON`` points at
another interpreter that has it. CI creates the venv (see the report / CI script); a machine without it
skips these tests and says how to install it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from calibrators import encodings as enc
from calibrators.calibrate import calibrate
from calibrators.encodings import qualcomm_activation_tensors
from trtbuild.ship.qualcomm import QualcommHandoff, export_qualcomm

ROOT = Path(__file__).resolve().parents[2]
AIMET_PYTHON = Path(os.environ.get("TRTBUILD_AIMET_PYTHON", ROOT / ".venv-aimet" / "bin" / "python"))
INSTALL_HINT = (
    "python3 -m venv --system-site-packages .venv-aimet && .venv-aimet/bin/pip install -c <(pip freeze | "
    "grep -E '^(torch|numpy|onnx|onnxruntime)==') aimet-onnx==2.42.0"
)

_DRIVER = """
import sys, onnx
from aimet_onnx import encodings_to_onnx_qdq
model = encodings_to_onnx_qdq(sys.argv[1], sys.argv[2])
onnx.save(model, sys.argv[3])
"""


def _aimet_ok() -> bool:
    if not AIMET_PYTHON.exists():
        return False
    probe = subprocess.run([str(AIMET_PYTHON), "-c", "import aimet_onnx"], capture_output=True, timeout=300)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(
    not _aimet_ok(), reason=f"aimet-onnx not installed at {AIMET_PYTHON}; install: {INSTALL_HINT}"
)


@pytest.fixture(scope="module")
def handoff(
    tmp_path_factory: pytest.TempPathFactory, effnet_onnx: Path, photo_batch: np.ndarray
) -> QualcommHandoff:
    ranges = calibrate(
        effnet_onnx,
        photo_batch[:12],
        "percentile",
        tensors=qualcomm_activation_tensors(effnet_onnx),
        show_progress=False,
    )
    return export_qualcomm(effnet_onnx, ranges, photo_batch[:4], tmp_path_factory.mktemp("qc") / "handoff")


def _aimet_qdq(model: Path, encodings: Path, out: Path) -> onnx.ModelProto:
    result = subprocess.run(
        [str(AIMET_PYTHON), "-c", _DRIVER, str(model), str(encodings), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return onnx.load(str(out))


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # exact Q/DQ semantics
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"images": x[i : i + 1]})[0] for i in range(len(x))])


def _ours(handoff: QualcommHandoff) -> onnx.ModelProto:
    model = onnx.load(str(handoff.onnx))
    doc = enc.load_encodings(handoff.encodings, model)
    acts = {
        e["name"]: enc.Encoding(tuple(e["scale"]), tuple(e["offset"]), e["is_sym"])
        for e in doc["activation_encodings"]
    }
    return enc.simulate(model, enc.EncodingSet(acts, enc.weight_encodings(model)))


@pytest.mark.parametrize("version", ["1.0.0", "0.6.1"])
def test_aimet_qdq_model_matches_our_simulation(
    tmp_path: Path, handoff: QualcommHandoff, photo_batch: np.ndarray, version: str
) -> None:
    encodings = handoff.encodings if version == "1.0.0" else handoff.encodings_061
    aimet_model = _aimet_qdq(handoff.onnx, encodings, tmp_path / "aimet_qdq.onnx")
    ours_model = _ours(handoff)
    # aimet puts a quantizer on every tensor we encoded (and derives more for data-movement ops such as
    # Clip/Pad, whose inputs share their output's encoding)
    doc = enc.load_encodings(handoff.encodings)
    encoded = {e["name"] for e in doc["activation_encodings"]} | {e["name"] for e in doc["param_encodings"]}
    quantized = {n.input[0] for n in aimet_model.graph.node if n.op_type == "QuantizeLinear"}
    outputs = {o.name for o in aimet_model.graph.output}
    assert encoded - outputs <= quantized and encoded & outputs == {"logits"}
    x = photo_batch[16:24]
    fp32 = _run(onnx.load(str(handoff.onnx)), x)
    theirs, ours = _run(aimet_model, x), _run(ours_model, x)
    # Same encodings read two ways: equal up to a few quantization steps of the logits' scale...
    logit_step = float(np.ptp(fp32)) / 255
    assert np.abs(theirs - ours).max() < 8 * logit_step, (np.abs(theirs - ours).max(), logit_step)
    assert (theirs.argmax(1) == ours.argmax(1)).all()
    # ...and much closer to each other than either is to FP32 (i.e. both really apply the quantization).
    assert np.abs(theirs - ours).mean() < 0.25 * np.abs(ours - fp32).mean()


def test_aimet_rejects_nothing_we_validate_but_we_reject_a_wrong_signed_offset(
    tmp_path: Path, handoff: QualcommHandoff
) -> None:
    """The reason for our own validator: AIMET's loader takes a positive offset without a word."""
    import json

    from trtbuild.core.errors import TrtbuildError

    doc = json.loads(handoff.encodings.read_text())
    doc["activation_encodings"][0]["offset"] = [abs(doc["activation_encodings"][0]["offset"][0]) + 1]
    bad = tmp_path / "bad.encodings"
    bad.write_text(json.dumps(doc))
    with pytest.raises(TrtbuildError, match="offset must be <= 0"):
        enc.load_encodings(bad)
    result = subprocess.run(
        [str(AIMET_PYTHON), "-c", _DRIVER, str(handoff.onnx), str(bad), str(tmp_path / "q.onnx")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, "aimet-onnx now rejects wrong-signed offsets itself: revisit our validator"


def test_aimet_stays_out_of_the_main_environment() -> None:
    """aimet-onnx must not be importable here: installing it into the main environment replaces torch."""
    main = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('aimet_onnx'))"],
        capture_output=True,
        text=True,
    )
    assert main.stdout.strip() == "None"

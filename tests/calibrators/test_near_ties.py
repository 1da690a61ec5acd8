"""Near-tie-aware top-1 (calibrators/near_ties.py) on the real EfficientNet-Lite0 and photo crops: the
floor is the FP16 graph's largest margin shift, every sample set aside is listed, the gate decides on the
rest, and 0 restores raw top-1."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_helpers import run_cli

from calibrators import fidelity, near_ties
from calibrators.output_kinds import OutputKind
from calibrators.quantize import quantize
from calibrators.quantize_settings import QuantizeSettings
from trtbuild import examples
from trtbuild.core.errors import TrtbuildError

HELD = 96  # enough crops that some FP32 top-2 margins fall under the FP16 noise


@pytest.fixture(scope="module")
def held(effnet_onnx: Path) -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    model = onnx.load(str(effnet_onnx))
    x = examples.normalize_imagenet(examples.photo_crops(HELD, seed=11))
    batches = [{"images": x[i : i + 32]} for i in range(0, HELD, 32)]
    return model, batches, fidelity.run_batches(fidelity.session(model, 1), batches)


def test_floor_is_the_fp16_graphs_largest_margin_shift(held: tuple) -> None:
    model, batches, reference = held
    kinds = fidelity.decide_kinds(model, reference)
    tied = near_ties.attach(kinds, model, reference, batches, threads=1)["logits"].ties
    assert tied is not None and tied.source == near_ties.FP16_SOURCE and tied.samples == HELD
    fp16 = fidelity.run_batches(fidelity.session(near_ties.fp16_graph(model), 1), batches)["logits"]
    ref = reference["logits"]
    best, second, margin = near_ties.margins(ref)
    rows = np.arange(HELD)
    shift = np.abs(fp16[rows, best] - fp16[rows, second] - margin)
    assert 0 < tied.floor == pytest.approx(float(shift.max()))
    assert tied.floor < 0.5  # FP16 noise, not a quantization-sized margin
    assert list(tied.tied) == np.flatnonzero(margin <= tied.floor).tolist()
    assert set(np.flatnonzero(fp16.argmax(1) != ref.argmax(1))) <= set(tied.tied)  # every FP16 flip
    # the kind itself (what judges the output) is unchanged, and 0 attaches nothing
    assert near_ties.attach(kinds, model, reference, batches, 0.0)["logits"].ties is None


def test_gate_decides_on_decisive_samples_and_lists_every_tie(held: tuple) -> None:
    model, batches, reference = held
    ref = reference["logits"]
    _, second, margin = near_ties.margins(ref)
    floor = float(np.sort(margin)[5])  # six near-ties
    kinds = near_ties.attach(fidelity.decide_kinds(model, reference), model, reference, batches, floor)
    ties = kinds["logits"].ties
    assert ties is not None and len(ties.tied) == 6
    # A "quantized" model that flips exactly the near-ties (FP32's runner-up wins there) and one more.
    test = ref.copy()
    decisive_miss = next(i for i in np.argsort(margin) if i not in ties.tied)
    for i in [*ties.tied, decisive_miss]:
        test[i, second[i]] = ref[i].max() + 1.0
    report = fidelity.compare(reference, {"logits": test}, kinds=kinds)
    out = report.outputs[0]
    assert out.raw_top1 == pytest.approx(1 - 7 / HELD)
    assert out.decisive_samples == HELD - 6
    assert out.top1_agreement == pytest.approx(1 - 1 / (HELD - 6))
    assert [t["sample"] for t in out.near_ties] == list(ties.tied)
    assert all(t["agrees"] is False and t["margin"] <= floor for t in out.near_ties)
    raw = fidelity.compare(reference, {"logits": test}, kinds=fidelity.decide_kinds(model, reference))
    assert raw.outputs[0].top1_agreement == out.raw_top1 and raw.outputs[0].near_ties == []
    text = report.summary()
    assert f"on {HELD - 6} decisive samples (6 near-tie" in text and f"on {HELD}" in text
    assert len(report.near_tie_lines()) == 1 and f"#{ties.tied[0]} (" in report.near_tie_lines()[0]


def test_quantize_reports_near_ties_in_json_cli_and_report(
    effnet_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = examples.write_photo_folder(tmp_path / "photos", 56, size=examples.EFFNET_SIZE, seed=7)
    res = quantize(
        effnet_onnx,
        photos,
        tmp_path / "auto",
        QuantizeSettings(holdout=32, min_fidelity="50%", threads=1, batch_size=16),
        show_progress=False,
    )
    logits = json.loads(res.report_path.read_text())["fidelity"]["outputs"][0]
    assert logits["decisive_samples"] + len(logits["near_ties"]) == 32
    assert "FP16 graph" in logits["tie_rule"] and logits["raw_top1"] is not None
    code, out, err = run_cli(
        ["quantize", str(effnet_onnx), "--data", str(photos), "--out-dir", str(tmp_path / "cli")]
        + ["--holdout", "32", "--min-fidelity", "50%", "--tie-margin", "100", "--threads", "1", "--report"],
        capsys,
    )
    text = " ".join((out + err).split())  # rich wraps long lines
    assert code == 0, text
    assert "decisive" in text and "near-tie(s) not counted by top-1" in text
    # a huge margin sets every sample aside: nothing decisive, raw top-1 decides, and the table warns
    assert "0 of them decisive" in text
    page = next((tmp_path / "cli").glob("*.report.html")).read_text()
    assert "near-ties" in page and "#0 (" in page and "#31 (" in page  # every one listed on the page


def test_bad_tie_margin_is_one_error_line(
    effnet_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(TrtbuildError, match="--tie-margin -1"):
        QuantizeSettings(tie_margin=-1.0)
    code, _, err = run_cli(
        ["quantize", str(effnet_onnx), "--data", str(tmp_path), "--tie-margin", "often"], capsys
    )
    assert code == 2 and "neither auto nor a number" in err


def test_per_position_outputs_set_aside_positions_not_whole_samples() -> None:
    """[N, T, C] character scores (a CTC reader): a tied position is left out of its sample's share."""
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(40, 6, 12))
    ref[5, 2, :2] = [9.0, 8.999]  # one position whose top-2 margin is 0.001
    test = ref.copy()
    test[5, 2, 1] = 9.5  # flipped exactly there
    test[7, 0] = np.roll(ref[7, 0], 1)  # and one decisive position elsewhere
    ties = near_ties.find(ref, 0.01, near_ties.SET_SOURCE)
    assert ties.rows == 6 and (5 * 6 + 2) in ties.tied
    kind = OutputKind("classification", "test", ties=ties)
    out = fidelity.compare_output("chars", ref, test, kind)
    assert out.decisive_samples == 40  # every sample still has decisive positions
    decisive_7 = 6 - sum(1 for i in ties.tied if i // 6 == 7)
    assert out.top1_agreement == pytest.approx(1 - (1 / decisive_7) / 40)
    assert {"sample": 5, "position": 2}.items() <= next(t for t in out.near_ties if t["sample"] == 5).items()


def test_measure_and_int4_gate_decide_top1_on_decisive_samples(
    held: tuple, effnet_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every top-1 gate uses the same rule: the Python API's fidelity.measure and the INT4 weight-only gate
    (EfficientNet-Lite0's classifier Gemm is its one INT4 layer) set the same kind of near-ties aside."""
    model, batches, reference = held
    auto = fidelity.measure(model, model, batches, reference=reference).outputs[0]
    assert auto.near_ties and auto.decisive_samples == HELD - len(auto.near_ties)
    assert auto.top1_agreement == auto.raw_top1 == 1.0  # the model against itself: every row agrees
    raw = fidelity.measure(model, model, batches, reference=reference, tie_margin=0).outputs[0]
    assert raw.near_ties == [] and raw.decisive_samples is None and raw.top1_agreement == 1.0  # raw top-1
    photos = examples.write_photo_folder(tmp_path / "photos", 48, size=examples.EFFNET_SIZE, seed=7)
    code, out, err = run_cli(
        ["quantize", str(effnet_onnx), "--data", str(photos), "--out-dir", str(tmp_path / "int4")]
        + ["--precision", "int4-weights", "--int4-algorithm", "rtn", "--holdout", "32"]
        + ["--min-fidelity", "50%", "--tie-margin", "100", "--threads", "1", "--json"],
        capsys,
    )
    assert code == 0, err
    logits = json.loads(out)["fidelity"]["outputs"][0]
    assert logits["decisive_samples"] == 0 and len(logits["near_ties"]) == 32  # a huge floor: all set aside
    assert logits["tie_rule"] and logits["raw_top1"] is not None


def test_a_noisy_fp16_graph_sets_no_ties_aside_on_a_ctc_reader() -> None:
    """PP-OCRv4's CTC reader (third-party, opset 12, [N, 40, 6625] probabilities): its FP16 graph shifts some
    position's margin by more than most positions' margins, so the auto floor would set aside a large
    share of the positions -- and once passed an INT8 graph at 99% whose raw agreement was 94%. Above
    MAX_AUTO_SHARE nothing is set aside: top-1 is raw, and the rule says why."""
    from test_quantize_models import REC_MEMBER, fetch_rapidocr_onnx, make_text_lines

    model = onnx.load(str(fetch_rapidocr_onnx(REC_MEMBER)))
    lines = make_text_lines(96)[64:]
    batches = [{"x": lines[i : i + 8]} for i in range(0, len(lines), 8)]
    reference = fidelity.run_batches(fidelity.session(model, 1), batches)
    (name,) = reference
    kinds = near_ties.attach(fidelity.decide_kinds(model, reference), model, reference, batches, threads=1)
    ties = kinds[name].ties
    assert ties is not None and ties.source == near_ties.NOISY_FP16_SOURCE and ties.tied == ()
    assert ties.refused_share is not None and ties.refused_share > near_ties.MAX_AUTO_SHARE
    # Judged against its own FP16 graph: the top-1 reported is the raw one, and the rule names the reason.
    fp16 = near_ties.fp16_graph(model)
    out = fidelity.measure(model, fp16, batches, reference=reference).outputs[0]
    raw = fidelity.measure(model, fp16, batches, reference=reference, tie_margin=0).outputs[0]
    assert out.top1_agreement == raw.top1_agreement and out.near_ties == [] and out.decisive_samples == 32
    assert out.tie_rule is not None and "too noisy" in out.tie_rule


def test_the_console_names_the_first_near_ties_and_the_json_all(held: tuple) -> None:
    model, batches, reference = held
    kinds = near_ties.attach(fidelity.decide_kinds(model, reference), model, reference, batches, 10.0)
    report = fidelity.compare(reference, reference, kinds=kinds)
    (every,) = report.near_tie_lines()
    (first,) = report.near_tie_lines(3)
    assert every.count("#") == HELD and first.count("#") == 3 and f"and {HELD - 3} more" in first

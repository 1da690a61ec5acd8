"""Fixtures shared by the calibrator tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from calibrators.calibrate import compute_ranges
from calibrators.collect import collect
from calibrators.qdq import GraphCache, quantizable_activations
from calibrators.ranges import RangeSet


@pytest.fixture(scope="module")
def effnet_mse(
    effnet_onnx: Path, photo_batch: np.ndarray
) -> tuple[GraphCache, RangeSet, list[dict[str, np.ndarray]]]:
    """EfficientNet-Lite0's graph, mse ranges from 16 photos, and those photos as two calibration batches."""
    model = onnx.load(str(effnet_onnx))
    calib = [{"images": photo_batch[i : i + 8]} for i in range(0, 16, 8)]
    collection = collect(model, calib, tensors=quantizable_activations(model), show_progress=False)
    return GraphCache(model), compute_ranges(collection, "mse"), calib

"""Learned rounding for the ORT-CPU variant (``write_variant``) on the variant's own weight grid.

The TensorRT graph learns its int8 weights' rounding (calibrators/adaround.py). The ORT-CPU variant next to
it stores other grids -- int7 where ORT's u8 x s8 kernels saturate, int8 for depthwise convs
(calibrators/ort_cpu.py, ort_depthwise.py) -- and its activations are uint8, so the TensorRT graph's learned
values do not carry over; rounded to nearest instead, the demo's variant fell from cosine 0.9952 to 0.9873
against FP32. When the TensorRT graph was learned, this learns the variant's rounding the same way, on the
same calibration samples, against the variant's own plan (each layer keeps nearest where learning measured
worse, as in quantize). docs/ort-cpu-int8.md has the measurements.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from calibrators import adaround
from calibrators.data import model_inputs, open_data
from calibrators.qdq import QdqOptions, plan_qdq
from calibrators.ranges import RangeSet

if TYPE_CHECKING:
    from calibrators.quantize_settings import QuantizeSettings


def learn_variant_rounding(
    model: onnx.ModelProto,
    ranges: RangeSet,
    options: QdqOptions,
    settings: QuantizeSettings | None,
    holdout: int,
    data: str | Path | None,
) -> adaround.LearnedRounding | None:
    """The variant's learned rounding, or None where quantize did not learn (or no data was given).

    ``holdout``: the held-out count quantize split off, so the calibration samples are the same ones."""
    if settings is None or settings.rounding != "learned" or data is None:
        return None
    calib, _ = open_data(data, model_inputs(model), settings.preprocess).split(holdout, settings.seed)
    calib = calib.sample(settings.samples, settings.seed)
    config = adaround.AdaRoundConfig(budget_s=settings.rounding_budget_s, seed=settings.seed)
    # As quantize does: learned on the plan without bias correction (learning targets the float output).
    plan = plan_qdq(model, ranges, replace(options, bias_correction=False))
    batches = calib.sample(config.samples, config.seed).batches(settings.batch_size)
    return adaround.learn_rounding(model, plan, batches, config, settings.threads)

"""The image-preprocessing options shared by every command that reads calibration data."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from calibrators.preprocess import DTYPES, IMAGENET_MEAN, IMAGENET_STD, LAYOUTS, Preprocess, parse_floats

data_option = click.option(
    "--data",
    "data_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Image folder, .npy/.npz file, or folder of .npy/.npz (npz keys = input names).",
)

_OPTIONS = (
    click.option(
        "--resize", type=int, default=None, help="Images: short side before cropping (default crop*256/224)."
    ),
    click.option(
        "--crop", type=int, default=None, help="Images: center-crop size (default: the model's input size)."
    ),
    click.option(
        "--mean",
        default=",".join(map(str, IMAGENET_MEAN)),
        show_default=True,
        help="Images: per-channel mean.",
    ),
    click.option(
        "--std", default=",".join(map(str, IMAGENET_STD)), show_default=True, help="Images: per-channel std."
    ),
    click.option(
        "--scale",
        type=float,
        default=1 / 255,
        show_default=True,
        help="Images: pixel multiplier before mean/std.",
    ),
    click.option(
        "--layout", type=click.Choice(LAYOUTS), default="NCHW", show_default=True, help="Images: layout."
    ),
    click.option(
        "--dtype",
        "image_dtype",
        type=click.Choice(DTYPES),
        default="float32",
        show_default=True,
        help="Images: array dtype fed to the model.",
    ),
)


def preprocess_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add the image options to ``command`` and hand it one ``preprocess: Preprocess`` argument instead."""
    return _with_preprocess(command, recorded_default=False)


def recorded_preprocess_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """As :func:`preprocess_options` for a handoff that feeds a calibrated model: ``preprocess`` is None
    when no image option was given, so the calibration's record decides
    (trtbuild/ship/calibration_preprocess.py)."""
    return _with_preprocess(command, recorded_default=True)


def _with_preprocess(command: Callable[..., Any], recorded_default: bool) -> Callable[..., Any]:
    @functools.wraps(command)
    def wrapper(
        *args: Any,
        resize: int | None,
        crop: int | None,
        mean: str,
        std: str,
        scale: float,
        layout: str,
        image_dtype: str,
        **kwargs: Any,
    ) -> Any:
        kwargs["preprocess"] = Preprocess(
            resize=resize,
            crop=crop,
            mean=parse_floats(mean, "mean"),
            std=parse_floats(std, "std"),
            scale=scale,
            layout=layout,
            dtype=image_dtype,
        )
        if recorded_default and not _any_given(_IMAGE_PARAMETERS):
            kwargs["preprocess"] = None
        return command(*args, **kwargs)

    decorated: Callable[..., Any] = wrapper
    for option in reversed(_OPTIONS):
        decorated = option(decorated)
    return decorated


_IMAGE_PARAMETERS = ("resize", "crop", "mean", "std", "scale", "layout", "image_dtype")


def _any_given(names: tuple[str, ...]) -> bool:
    """Whether the command line (or the environment) set any of the parameters ``names``."""
    ctx = click.get_current_context()
    return any(ctx.get_parameter_source(n) not in (None, click.core.ParameterSource.DEFAULT) for n in names)

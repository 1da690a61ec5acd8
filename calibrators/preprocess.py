"""How an image file becomes a model input: resize, center-crop, scale, mean/std, layout, dtype."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trtbuild.core.errors import TrtbuildError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".gif")
LAYOUTS = ("NCHW", "NHWC")
DTYPES = ("float32", "float16", "uint8")
# Where a Q/DQ ONNX written by `quantize` records its calibration images' preprocessing (JSON of the fields)
META_KEY = "trtbuild.preprocess"
# The fields that decide the pixels a model sees (resize/crop only frame them)
PIXEL_FIELDS = ("mean", "std", "scale", "layout", "dtype")


@dataclass(frozen=True)
class Preprocess:
    """Image preprocessing. Defaults are ImageNet's: short side to 256, center crop 224, /255, mean/std, NCHW.

    ``crop=None`` takes the crop from the model's input shape; ``resize=None`` then uses crop * 256 / 224.
    """

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    scale: float = 1.0 / 255.0
    layout: str = "NCHW"
    dtype: str = "float32"
    channels: int = 3  # 3: RGB, 1: grayscale

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise TrtbuildError(f"unknown layout '{self.layout}'", f"use one of {', '.join(LAYOUTS)}")
        if self.dtype not in DTYPES:
            raise TrtbuildError(f"unknown image dtype '{self.dtype}'", f"use one of {', '.join(DTYPES)}")
        if self.channels not in (1, 3):
            raise TrtbuildError(f"images must have 1 or 3 channels, not {self.channels}", "pass 1 or 3")
        for label, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, self.channels):
                raise TrtbuildError(
                    f"--{label} has {len(values)} values for {self.channels} channels",
                    f"give 1 or {self.channels} comma-separated values",
                )
        if any(s == 0 for s in self.std):
            raise TrtbuildError("--std contains 0", "use non-zero standard deviations")
        for label, size in (("resize", self.resize), ("crop", self.crop)):
            if size is not None and size <= 0:
                raise TrtbuildError(f"--{label} must be positive, not {size}", "pass a size in pixels")

    def for_input_shape(self, shape: tuple[int | None, ...]) -> Preprocess:
        """Fill a missing crop from a model input shape (N,C,H,W or N,H,W,C) and check its channels."""
        if len(shape) != 4:
            raise TrtbuildError(
                f"an image folder needs a 4-D model input, this one has shape {shape}",
                "pass .npy/.npz arrays instead of images",
            )
        c, h, w = (shape[1], shape[2], shape[3]) if self.layout == "NCHW" else (shape[3], shape[1], shape[2])
        if isinstance(c, int) and c not in (1, 3):
            hint = "use --layout NHWC" if self.layout == "NCHW" else "use --layout NCHW"
            raise TrtbuildError(f"model input shape {shape} does not look like {self.layout} images", hint)
        crop = self.crop
        if crop is None:
            if isinstance(h, int) and isinstance(w, int) and h != w:
                raise TrtbuildError(f"model input is {h}x{w}, not square", "pass --crop explicitly")
            crop = h if isinstance(h, int) else 224
        channels = c if isinstance(c, int) else self.channels
        return Preprocess(
            self.resize, crop, self.mean, self.std, self.scale, self.layout, self.dtype, channels
        )

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Preprocess:
        """The preprocessing a calibration recorded (``dataclasses.asdict`` of one, from JSON)."""
        known = {k: v for k, v in record.items() if k in cls.__dataclass_fields__}
        for key in ("mean", "std"):
            if key in known:
                known[key] = tuple(float(v) for v in known[key])
        return cls(**known)

    def pixel_differences(self, other: Preprocess) -> list[str]:
        """The pixel-math fields (PIXEL_FIELDS) in which ``other`` feeds the model other values; a 1-value
        mean/std equals the same value given per channel."""
        out = []
        for field in PIXEL_FIELDS:
            mine, theirs = getattr(self, field), getattr(other, field)
            if field in ("mean", "std", "scale"):
                a, b = np.atleast_1d(np.asarray(mine, float)), np.atleast_1d(np.asarray(theirs, float))
                same = bool(np.allclose(a, b, rtol=1e-6, atol=0.0))  # broadcasts a 1-value mean
            else:
                same = mine == theirs
            if not same:
                out.append(field)
        return out

    def apply(self, path: Path) -> np.ndarray:
        """Read one image file and return it with a leading batch dim of 1."""
        from PIL import Image, UnidentifiedImageError

        crop = self.crop or 224
        resize = self.resize or round(crop * 256 / 224)
        try:
            with Image.open(path) as opened:
                img = opened.convert("RGB" if self.channels == 3 else "L")
            w, h = img.size
            ratio = resize / min(w, h)
            size = (max(crop, round(w * ratio)), max(crop, round(h * ratio)))
            img = img.resize(size, Image.Resampling.BILINEAR)
            left, top = (size[0] - crop) // 2, (size[1] - crop) // 2
            pixels = np.asarray(img.crop((left, top, left + crop, top + crop)))
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise TrtbuildError(f"cannot read image {path}: {exc}", "remove or replace the file") from exc
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        x: np.ndarray[Any, Any]
        if self.dtype == "uint8":
            x = pixels.astype(np.uint8)
        else:
            x = pixels.astype(np.float32) * np.float32(self.scale)
            x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
            x = x.astype(self.dtype)
        if self.layout == "NCHW":
            x = x.transpose(2, 0, 1)
        return np.ascontiguousarray(x[None])


def pixel_text(value: object) -> str:
    """A preprocessing field as the command line writes it (0.485,0.456,0.406)."""
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def parse_floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise TrtbuildError(
            f"cannot parse --{what} '{text}'", "write comma-separated numbers, e.g. 0.485,0.456,0.406"
        ) from exc

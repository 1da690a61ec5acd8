"""Inputs for profiling: real data (npy / npz, or the bundled photos for image models) or seeded random,
never zeros (zeros hit fast paths and make INT8 look perfect)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from trtbuild.core.errors import TrtbuildError
from trtbuild.core.inputs import check_tensor_size
from trtbuild.harness.runner import Feed, RunnerTensor


def load_data(path: str | Path) -> dict[str, np.ndarray] | np.ndarray:
    """An ``.npy`` (one array, for single-input models) or ``.npz`` (arrays named like the inputs)."""
    path = Path(path)
    if not path.is_file():
        raise TrtbuildError(
            f"data file {path} does not exist", "pass an existing .npy or .npz file to --data"
        )
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
    except Exception as exc:
        raise TrtbuildError(f"cannot read {path}: {exc}", "save it with numpy.save / numpy.savez") from exc
    raise TrtbuildError(f"data file {path} is not .npy or .npz", "save inputs with numpy.save or numpy.savez")


def _concrete_shape(info: RunnerTensor, batch: int) -> tuple[int, ...]:
    dims = list(info.shape)
    if not dims:
        return ()
    out = [batch]
    for i, d in enumerate(dims[1:], start=1):
        if not isinstance(d, int) or d < 1:
            raise TrtbuildError(
                f"input '{info.name}' has a dynamic dimension {i} ({d!r}) besides the batch",
                "pass real inputs with --data (an .npz named by input)",
            )
        out.append(d)
    # A declared (or --batch) shape no machine can hold is one error line, not a MemoryError.
    check_tensor_size(
        f"input '{info.name}' at batch {batch}", out, info.dtype, fix="profile a smaller --batch"
    )
    return tuple(out)


def _take_batch(array: np.ndarray, name: str, batch: int, dtype: np.dtype[Any]) -> np.ndarray:
    if array.ndim == 0 or array.shape[0] == 0:
        raise TrtbuildError(f"data for input '{name}' is empty", "give at least one sample per input")
    reps = -(-batch // array.shape[0])  # cycle real samples to fill larger batches
    return np.ascontiguousarray(np.concatenate([array] * reps)[:batch].astype(dtype, copy=False))


def _batched(array: np.ndarray, info: RunnerTensor) -> bool:
    """Whether ``array``'s axis 0 holds samples: not for a scalar input, nor for an array whose axis 0 is the
    input's fixed leading dim (Silero VAD's `sr`, and its `state` [2, ?, 128])."""
    lead = info.shape[0] if info.shape else None
    fixed_lead = (
        isinstance(lead, int) and lead > 0 and array.ndim == len(info.shape) and array.shape[0] == lead
    )
    return bool(info.shape) and not fixed_lead


def _from_data(array: np.ndarray, info: RunnerTensor, batch: int) -> np.ndarray:
    """A batch from real data; an input whose axis 0 holds no samples is fed as it is (its `sr` read as
    "empty", its `state` was cut to 1x1x128)."""
    if _batched(array, info):
        return _take_batch(array, info.name, batch, info.dtype)
    if array.ndim != len(info.shape):
        raise TrtbuildError(
            f"data for input '{info.name}' has shape {array.shape}, the model takes a scalar",
            "save that input as a 0-d array (numpy.array(value))",
        )
    return np.ascontiguousarray(array.astype(info.dtype, copy=False))


def _is_image(info: RunnerTensor, shape: tuple[int, ...]) -> bool:
    return (
        len(shape) == 4
        and shape[1] == 3
        and shape[2] == shape[3]
        and shape[2] >= 32
        and info.dtype.kind == "f"
    )


def _photos(shape: tuple[int, ...], batch: int, seed: int) -> np.ndarray | None:
    """Real photo crops, ImageNet-normalised; None when the examples extra (scikit-image) is missing."""
    from trtbuild import examples

    try:
        return examples.normalize_imagenet(examples.photo_crops(batch, size=shape[2], seed=seed))
    except TrtbuildError:
        return None


def seeded_random(info: RunnerTensor, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if info.dtype.kind == "f":
        return rng.standard_normal(shape).astype(info.dtype)
    if info.dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(np.bool_)
    return rng.integers(1, 100, shape).astype(info.dtype)  # ids/indices: small, never all zero


def make_feed(
    inputs: list[RunnerTensor],
    batch: int,
    data: str | Path | dict[str, np.ndarray] | None = None,
    seed: int = 0,
) -> Feed:
    """One feed of ``batch`` samples: from ``data``, else photos for image inputs, else seeded random."""
    loaded = load_data(data) if isinstance(data, (str, Path)) else data
    if isinstance(loaded, np.ndarray):
        if len(inputs) != 1:
            raise TrtbuildError(
                f"the model has {len(inputs)} inputs but the .npy holds one array",
                "save one array per input name in an .npz",
            )
        loaded = {inputs[0].name: loaded}
    feed: Feed = {}
    for k, info in enumerate(inputs):
        if loaded is not None:
            if info.name not in loaded:
                raise TrtbuildError(
                    f"data has no array named '{info.name}' (has: {', '.join(loaded)})",
                    "name the .npz arrays after the model inputs",
                )
            feed[info.name] = _from_data(loaded[info.name], info, batch)
            continue
        shape = _concrete_shape(info, batch)
        photos = _photos(shape, batch, seed) if _is_image(info, shape) else None
        feed[info.name] = (
            np.ascontiguousarray(photos.astype(info.dtype))
            if photos is not None
            else seeded_random(info, shape, seed + k)
        )
    return feed


def accuracy_feeds(
    inputs: list[RunnerTensor], samples: int, data: str | Path | None = None, seed: int = 1, chunk: int = 8
) -> list[Feed]:
    """``samples`` distinct samples in feeds of up to ``chunk``: consecutive rows of ``data``, else fresh
    photo crops / random draws per feed (different seeds, so no sample repeats)."""
    if samples < 1:
        raise TrtbuildError("accuracy needs at least one sample", "pass --accuracy-samples 1 or more")
    loaded = load_data(data) if data is not None else None
    feeds = []
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        if loaded is None:
            feeds.append(make_feed(inputs, n, None, seed=seed + start))
            continue
        arrays = {inputs[0].name: loaded} if isinstance(loaded, np.ndarray) else loaded
        info = {i.name: i for i in inputs}
        batched = {k for k, a in arrays.items() if k not in info or _batched(a, info[k])}
        rows = min((len(arrays[k]) for k in batched), default=1)
        if start >= rows:
            break  # fewer real samples than asked for: use what there is
        rows_now = {k: a[start : start + n] if k in batched else a for k, a in arrays.items()}
        feeds.append(make_feed(inputs, min(n, rows - start), rows_now))
    return feeds

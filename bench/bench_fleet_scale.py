"""Fleet metadata at scale, by simulation with python-tuf: 10,000 models x 10 targets (100,000 releases).

Compares one flat targets file with TUF's hashed-bin delegation (succinct roles) and measures, for one
device, the metadata bytes it downloads and the time python-tuf's ngclient takes to verify them and find
its release. Metadata is served from memory, so the numbers are the client's own cost, not the network's.

    python3 bench/bench_fleet_scale.py [--models 10000] [--targets 10] [--bits 10]
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

from securesystemslib.signer import CryptoSigner
from tuf.api import exceptions
from tuf.api.metadata import (
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    SuccinctRoles,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

BASE = "mem://meta/"


class MemoryFetcher(FetcherInterface):
    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.bytes = 0

    def _fetch(self, url: str) -> Iterator[bytes]:
        name = url[len(BASE) :]
        if name not in self.files:
            raise exceptions.DownloadHTTPError(name, 404)
        self.bytes += len(self.files[name])
        return iter([self.files[name]])


def _target(model: int, target: int) -> TargetFile:
    path = f"model{model:05d}/target{target:02d}/fp16/model{model:05d}-1-target{target:02d}-fp16.tar.gz"
    digest = hashlib.sha256(path.encode()).hexdigest()  # stands in for the bundle's hash
    info = TargetFile(20_000_000, {"sha256": digest}, path)
    info.unrecognized_fields["custom"] = {
        "trtbuild": {"model": f"model{model:05d}", "version": "1", "target": f"target{target:02d}"}
    }
    return info


def build(models: int, targets: int, bits: int | None) -> tuple[bytes, dict[str, bytes], str]:
    """Root bytes and every metadata file by name (consistent snapshots); plus one target path to find."""
    key = CryptoSigner.generate_ed25519()
    expires = datetime.now(timezone.utc) + timedelta(days=1)
    root = Metadata(Root(expires=expires, consistent_snapshot=True))
    for role in ("root", "targets", "snapshot", "timestamp"):
        root.signed.add_key(key.public_key, role)
    root.sign(key)
    files: dict[str, bytes] = {"1.root.json": root.to_bytes()}
    top = Metadata(Targets(expires=expires))
    snapshot = Metadata(Snapshot(expires=expires))
    infos = [_target(m, t) for m in range(models) for t in range(targets)]
    if bits is None:
        for info in infos:
            top.signed.targets[info.path] = info
    else:
        succinct = SuccinctRoles([key.public_key.keyid], 1, bits, "bin")
        top.signed.delegations = Delegations({key.public_key.keyid: key.public_key}, succinct_roles=succinct)
        bins: dict[str, Metadata[Targets]] = {
            name: Metadata(Targets(expires=expires)) for name in succinct.get_roles()
        }
        for info in infos:
            bins[succinct.get_role_for_target(info.path)].signed.targets[info.path] = info
        for name, md in bins.items():
            md.sign(key)
            data = md.to_bytes()
            files[f"1.{name}.json"] = data
            snapshot.signed.meta[f"{name}.json"] = MetaFile(1)
    top.sign(key)
    files["1.targets.json"] = top.to_bytes()
    snapshot.sign(key)
    files["1.snapshot.json"] = snapshot.to_bytes()
    timestamp = Metadata(Timestamp(expires=expires))
    timestamp.signed.snapshot_meta = MetaFile(1)
    timestamp.sign(key)
    files["timestamp.json"] = timestamp.to_bytes()
    return files["1.root.json"], files, infos[len(infos) // 2].path


def client(root: bytes, files: dict[str, bytes], path: str) -> tuple[float, int]:
    fetcher = MemoryFetcher(files)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        config = UpdaterConfig(targets_max_length=200_000_000, snapshot_max_length=50_000_000)
        updater = Updater(tmp, BASE, tmp, "mem://t/", fetcher, config, bootstrap=root)
        updater.refresh()
        assert updater.get_targetinfo(path) is not None
        return time.perf_counter() - start, fetcher.bytes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=int, default=10_000)
    parser.add_argument("--targets", type=int, default=10)
    parser.add_argument("--bits", type=int, default=10, help="hashed bins: 2**bits delegated roles")
    args = parser.parse_args()
    n = args.models * args.targets
    print(f"{args.models} models x {args.targets} targets = {n} releases")
    for label, bits in (("flat targets", None), (f"hashed bins (2^{args.bits})", args.bits)):
        start = time.perf_counter()
        root, files, path = build(args.models, args.targets, bits)
        built = time.perf_counter() - start
        seconds, downloaded = client(root, files, path)
        total = sum(len(v) for v in files.values())
        print(
            f"{label:22s} repository metadata {total / 1e6:8.1f} MB (built+signed in {built:5.1f} s); "
            f"one device downloads {downloaded / 1e6:7.2f} MB and verifies in {seconds:6.2f} s"
        )


if __name__ == "__main__":
    main()

"""`fleet update`: the device agent. TUF (python-tuf's ngclient) decides what is trusted: it refuses
rollback, freeze, mix-and-match, unknown files and oversize or stalled downloads. The bundle's own signature
and hashes are then checked while it is extracted; the on-device build and the smoke test run; and only
then does ``current`` switch. A failed smoke test leaves (rolls back to) the version that was current."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from tuf.api import exceptions
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.ngclient import Updater, UpdaterConfig

from trtbuild.bundle.device import detect_device
from trtbuild.bundle.manifest import Manifest
from trtbuild.bundle.verify import check_device, verify_bundle
from trtbuild.core import atomic
from trtbuild.core.errors import TrtbuildError
from trtbuild.fleet import install, oci
from trtbuild.fleet import state as state_mod
from trtbuild.fleet.fetcher import META_BASE, TARGET_BASE, OciFetcher
from trtbuild.fleet.install import checkpoint
from trtbuild.fleet.smoke import device_step, run_smoke

TUF_DIR = "tuf"
DOWNLOADS = "downloads"
DEFAULT_KEEP = 3
_FIELDS = ("model", "version", "target", "precision")


@dataclass(frozen=True)
class UpdateResult:
    result: str  # installed | up-to-date
    release: str
    current: str | None
    engine: str
    reason: str
    bytes_downloaded: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def version_key(text: str) -> tuple[Any, ...]:
    """'2.10' > '2.9'; numeric parts compare as numbers, others as text."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in text.replace("-", ".").split("."))


def _tuf_error(exc: Exception) -> TrtbuildError:
    """One line per attack class, naming what TUF refused."""
    fix = "the registry or a mirror serves bad metadata: nothing was installed; tell the release owners"
    if isinstance(exc, exceptions.ExpiredMetadataError):
        return TrtbuildError(
            f"refused frozen release metadata: {exc}", "run `trtbuild fleet refresh` on the repo"
        )
    if isinstance(exc, exceptions.BadVersionNumberError):
        return TrtbuildError(f"refused a rollback or mix-and-match of release metadata: {exc}", fix)
    if isinstance(exc, exceptions.LengthOrHashMismatchError):
        return TrtbuildError(f"refused metadata or a bundle that does not match its signed hash: {exc}", fix)
    if isinstance(exc, exceptions.UnsignedMetadataError):
        return TrtbuildError(f"refused release metadata without valid signatures: {exc}", fix)
    if isinstance(exc, exceptions.DownloadLengthMismatchError):
        return TrtbuildError(f"refused a download larger than its signed length: {exc}", fix)
    if isinstance(exc, exceptions.SlowRetrievalError):
        return TrtbuildError(f"refused a slow retrieval: {exc}", "check the registry and retry")
    if isinstance(exc, exceptions.DownloadHTTPError):
        return TrtbuildError(f"the registry has no such file: {exc}", "check --registry")
    if isinstance(exc, exceptions.DownloadError):
        cause = exc.__cause__
        return TrtbuildError(f"download failed: {exc} ({cause})", "check the registry and retry")
    return TrtbuildError(f"release metadata refused: {type(exc).__name__}: {exc}", fix)


def read_trust_root(root: Path, trust_root: Path | None) -> bytes | None:
    """The bootstrap root.json on a device's first run; None once python-tuf keeps its own trusted copy."""
    if (root / TUF_DIR / "root.json").exists():
        return None
    if trust_root is None:
        raise TrtbuildError(
            f"{root} has no trusted root metadata yet", "pass --root with the root.json `fleet init` wrote"
        )
    try:
        data = trust_root.read_bytes()
    except OSError as exc:
        raise TrtbuildError(
            f"cannot read root metadata {trust_root}: {exc.strerror}", "pass the root.json `fleet init` wrote"
        ) from exc
    try:
        Metadata[Root].from_bytes(data)
    except Exception as exc:  # python-tuf raises several kinds for malformed metadata
        raise TrtbuildError(
            f"{trust_root} is not TUF root metadata ({str(exc)[:120]})",
            "pass the root.json `fleet init` wrote",
        ) from exc
    return data


def _updater(reg: oci.Registry, root: Path, bootstrap: bytes | None, deadline_s: float) -> Updater:
    tuf_dir = root / TUF_DIR
    tuf_dir.mkdir(parents=True, exist_ok=True)
    (root / DOWNLOADS).mkdir(exist_ok=True)
    try:
        return Updater(
            str(tuf_dir),
            META_BASE,
            str(root / DOWNLOADS),
            TARGET_BASE,
            OciFetcher(reg, deadline_s),
            UpdaterConfig(app_user_agent="trtbuild-fleet"),
            bootstrap=bootstrap,
        )
    except (exceptions.RepositoryError, ValueError) as exc:
        raise TrtbuildError(f"the trusted root metadata is invalid ({exc})", "pass the right --root") from exc


def resolve_device(device: str) -> str | None:
    """A target id, or None for 'auto' (then each candidate's requirements are checked on this machine)."""
    if device != "auto":
        return device
    if detect_device() is None:
        raise TrtbuildError(
            "cannot detect this device: no Jetson (/etc/nv_tegra_release) and no NVIDIA GPU (nvidia-smi)",
            "pass --device with this device's target id (see `trtbuild targets`)",
        )
    return None


_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")  # becomes a folder name on the device


def _well_formed(meta: Any) -> bool:
    """Entries this agent understands; anything else in the targets metadata is skipped, never trusted."""
    return (
        isinstance(meta, dict)
        and all(isinstance(meta.get(k), str) and _SAFE.fullmatch(meta[k]) for k in _FIELDS)
        and isinstance(meta.get("requires"), dict)
    )


def _fits(info: TargetFile, device: str | None, model: str | None) -> bool:
    found = info.custom.get("trtbuild") if isinstance(info.custom, dict) else None
    if not _well_formed(found):
        return False
    meta: dict[str, Any] = dict(found or {})
    if model and meta["model"] != model:
        return False
    if device is not None:
        return str(meta.get("target", "")).lower() == device.lower()
    probe = Manifest(
        meta["model"], meta["version"], meta["target"], meta["precision"], meta["requires"], {}, {}
    )
    try:
        check_device(probe, None, detect_device())
    except TrtbuildError:
        return False
    return True


def choose(updater: Updater, device: str | None, model: str | None, version: str | None) -> TargetFile:
    """The newest release for this device in the signed targets metadata (or the pinned version)."""
    targets = updater._trusted_set.targets.targets  # python-tuf has no public listing of targets
    fitting = [t for t in targets.values() if _fits(t, device, model)]
    if version is not None:
        fitting = [t for t in fitting if t.custom["trtbuild"]["version"] == version]
    if not fitting:
        what = f"version {version} " if version else ""
        raise TrtbuildError(
            f"no release {what}for device '{device or 'auto'}'{f' and model {model}' if model else ''} "
            "in the signed targets metadata",
            "publish one with `trtbuild fleet publish`, or pass the right --device/--model",
        )
    return max(fitting, key=lambda t: version_key(t.custom["trtbuild"]["version"]))


def _check_matches(manifest: Manifest, info: TargetFile) -> None:
    """The signed bundle must be the release TUF named: no bundle of another model/version swapped in."""
    meta = info.custom["trtbuild"]
    got = (manifest.model, manifest.model_version, manifest.target, manifest.precision)
    want = (meta["model"], meta["version"], meta["target"], meta["precision"])
    if got != want:
        raise TrtbuildError(
            f"bundle is {'/'.join(got)} but the release metadata names {'/'.join(want)} (mix-and-match)",
            "nothing was installed; tell the release owners",
        )


def update(
    reg: oci.Registry,
    root: Path,
    bundle_key: Ed25519PublicKey,
    *,
    device: str = "auto",
    model: str | None = None,
    version: str | None = None,
    trust_root: Path | None = None,
    keep: int = DEFAULT_KEEP,
    deadline_s: float = 600.0,
) -> UpdateResult:
    bootstrap = read_trust_root(root, trust_root)  # bad input is refused before the install root is made
    target_id = resolve_device(device)
    with install.locked(root):
        st = state_mod.load(root)
        install.clean_unrecorded(root, st)
        shutil.rmtree(root / DOWNLOADS, ignore_errors=True)
        updater = _updater(reg, root, bootstrap, deadline_s)
        fetcher = updater._fetcher
        try:
            updater.refresh()
            info = choose(updater, target_id, model, version)
        except (exceptions.RepositoryError, exceptions.DownloadError) as exc:
            err = _tuf_error(exc)
            st.event("metadata", "refused", err.problem)
            state_mod.save(root, st)
            raise err from exc
        meta = info.custom["trtbuild"]
        name = f"{meta['model']}-{meta['version']}-{meta['target']}-{meta['precision']}"
        return _install(reg, root, st, updater, info, name, bundle_key, keep, fetcher, version is not None)


def _refuse(root: Path, st: state_mod.State, release: str, err: TrtbuildError) -> TrtbuildError:
    st.event(release, "refused", err.problem)
    state_mod.save(root, st)
    return err


def _install(
    reg: oci.Registry,
    root: Path,
    st: state_mod.State,
    updater: Updater,
    info: TargetFile,
    name: str,
    bundle_key: Ed25519PublicKey,
    keep: int,
    fetcher: Any,
    pinned: bool,
) -> UpdateResult:
    meta = info.custom["trtbuild"]
    cur = install.current_name(root)
    cur_rec = st.find(cur) if cur else None
    if cur_rec and cur_rec.name == name:
        return UpdateResult("up-to-date", name, cur, cur_rec.engine, cur_rec.engine_reason, 0)
    if (
        cur_rec
        and not pinned
        and cur_rec.model == meta["model"]
        and version_key(meta["version"]) < version_key(cur_rec.version)
    ):
        raise _refuse(
            root,
            st,
            name,
            TrtbuildError(
                f"refused rollback: newest signed release {meta['version']} is older than installed "
                f"{cur_rec.version}",
                "use `trtbuild fleet rollback` or `fleet update --version` to go back on purpose",
            ),
        )
    recorded = st.find(name)
    if recorded is not None and not _still_intact(root, recorded.name):
        st.versions.remove(recorded)  # damaged since it was installed: fetch and verify it again
        shutil.rmtree(root / install.VERSIONS / name, ignore_errors=True)
        recorded = None
    if recorded is None:
        try:
            bundle = Path(updater.download_target(info, str(root / DOWNLOADS / f"{name}.tar.gz")))
        except (exceptions.RepositoryError, exceptions.DownloadError) as exc:
            raise _refuse(root, st, name, _tuf_error(exc)) from exc
        checkpoint("downloaded")
        dest = root / install.VERSIONS / name
        shutil.rmtree(dest, ignore_errors=True)  # an unrecorded leftover of a killed run
        try:
            report = verify_bundle(bundle, bundle_key, device=meta["target"], extract_to=dest)
            _check_matches(report.manifest, info)
        except TrtbuildError as exc:
            shutil.rmtree(dest, ignore_errors=True)
            raise _refuse(root, st, name, exc) from exc
        finally:
            bundle.unlink(missing_ok=True)
        manifest = report.manifest
        checkpoint("extracted")
        engine, engine_reason = device_step(dest, manifest)
        checkpoint("built")
        try:
            smoke = run_smoke(dest, manifest)
        except TrtbuildError as exc:
            shutil.rmtree(dest, ignore_errors=True)
            kept = f"; `current` stays on {cur}" if cur else "; nothing is current"
            err = TrtbuildError(exc.problem + kept, exc.fix)
            st.event(name, "rolled back", err.problem)
            state_mod.save(root, st)
            raise err from exc
        atomic.write_text(
            root / install.MANIFESTS / f"{name}.json", json.dumps(manifest.to_json(), indent=2) + "\n"
        )
        recorded = state_mod.Installed(
            name, manifest.model, manifest.model_version, manifest.target, info.path,
            info.hashes["sha256"], engine, engine_reason, smoke,
        )  # fmt: skip
        st.versions.append(recorded)
        st.event(name, "verified", smoke)
        state_mod.save(root, st)  # recorded before the switch: a kill here leaves it ready to switch to
    checkpoint("recorded")
    install.switch_current(root, name)
    checkpoint("switched")
    result = "installed" if recorded.engine != "pending" else "installed (engine pending)"
    st.event(name, result, recorded.engine_reason)
    install.prune(root, st, keep)
    state_mod.save(root, st)
    return UpdateResult(
        result, name, name, recorded.engine, recorded.engine_reason, getattr(fetcher, "bytes_read", 0)
    )


def _still_intact(root: Path, name: str) -> bool:
    try:
        manifest = Manifest.from_json(json.loads((root / install.MANIFESTS / f"{name}.json").read_text()))
        install.check_files(root, name, {k: (v.sha256, v.size) for k, v in manifest.files.items()})
    except (OSError, ValueError, TrtbuildError):
        return False
    return True


def rollback(root: Path, to: str | None = None) -> str:
    """Switch ``current`` to the previous installed version (or ``to``); return its name."""
    with install.locked(root):
        st = state_mod.load(root)
        cur = install.current_name(root)
        names = [v.name for v in st.versions]
        if to is not None:
            if to not in names:
                raise TrtbuildError(
                    f"{to} is not installed here", f"pick one of: {', '.join(names) or 'none'}"
                )
            pick = to
        else:
            before = names[: names.index(cur)] if cur in names else names
            if not before:
                raise TrtbuildError("no earlier version is installed", "nothing to roll back to")
            pick = before[-1]
        if not _still_intact(root, pick):
            raise TrtbuildError(
                f"installed {pick} is damaged", "run `trtbuild fleet update --version` for it"
            )
        install.switch_current(root, pick)
        # the abandoned version moves to the end of the history: a second rollback goes further back
        if cur in names:
            rec = st.find(cur)
            assert rec is not None
            st.versions.remove(rec)
            st.versions.append(rec)
        st.event(pick, "rolled back", f"by request, from {cur}")
        state_mod.save(root, st)
        return pick


def verify_current(root: Path) -> str:
    """Re-check ``current``: every file against its signed manifest, then the smoke test."""
    cur = install.current_name(root)
    if cur is None:
        raise TrtbuildError(f"nothing is installed in {root}", "run `trtbuild fleet update`")
    doc = json.loads((root / install.MANIFESTS / f"{cur}.json").read_text())
    manifest = Manifest.from_json(doc)
    install.check_files(root, cur, {k: (v.sha256, v.size) for k, v in manifest.files.items()})
    return run_smoke(root / install.VERSIONS / cur, manifest)

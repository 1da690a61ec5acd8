"""CLI: `fleet init|publish|refresh|rotate|update|rollback|status` (thin over trtbuild.fleet)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.table import Table

from trtbuild.core.console import emit_json, out

if TYPE_CHECKING:
    from trtbuild.fleet.oci import Registry

_F = TypeVar("_F", bound=Callable[..., Any])

_REGISTRY_HELP = "HOST[:PORT]/REPO of any OCI registry (credentials: Docker config or TRTBUILD_REGISTRY_*)."


def _registry(text: str, plain_http: bool | None, timeout: float = 30.0) -> Registry:
    from trtbuild.fleet.oci import parse_registry

    return parse_registry(text, plain_http, timeout)


def _plain_http_option(f: _F) -> _F:
    return click.option(
        "--plain-http/--https",
        default=None,
        help="Talk plain HTTP to the registry [plain on loopback only].",
    )(f)


@click.group("fleet")
def fleet() -> None:
    """Fleet distribution: bundles as OCI artifacts, releases as TUF metadata, a device agent."""


@fleet.command("init")
@click.option("--registry", required=True, help=_REGISTRY_HELP)
@click.option("--root-key", "root_keys", required=True, multiple=True, type=click.Path(dir_okay=False))
@click.option("--root-threshold", default=1, show_default=True, help="Root signatures required.")
@click.option("--targets-key", required=True, type=click.Path(dir_okay=False), help="Offline targets key.")
@click.option("--online-key", required=True, type=click.Path(dir_okay=False), help="Snapshot/timestamp key.")
@click.option("--out", "root_out", default="root.json", show_default=True, type=click.Path(dir_okay=False))
@_plain_http_option
def init(
    registry: str,
    root_keys: tuple[str, ...],
    root_threshold: int,
    targets_key: str,
    online_key: str,
    root_out: str,
    plain_http: bool | None,
) -> None:
    """Create the release metadata (TUF v1 of every role); write root.json, the devices' trust anchor.

    Keys are Ed25519 PEM files from `trtbuild bundle keygen`."""
    from trtbuild.fleet.keys import signer
    from trtbuild.fleet.repository import RoleKeys, init_repository

    keys = RoleKeys([signer(k) for k in root_keys], signer(targets_key), signer(online_key))
    path = init_repository(_registry(registry, plain_http), keys, Path(root_out), root_threshold)
    out.print(f"release metadata created in {registry}; device trust anchor: {path}")


@fleet.command("publish")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--registry", required=True, help=_REGISTRY_HELP)
@click.option("--pub", required=True, type=click.Path(dir_okay=False), help="Bundle signing public key.")
@click.option("--targets-key", required=True, type=click.Path(dir_okay=False), help="Offline targets key.")
@click.option("--online-key", required=True, type=click.Path(dir_okay=False), help="Snapshot/timestamp key.")
@_plain_http_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def publish_cmd(
    bundles: tuple[str, ...],
    registry: str,
    pub: str,
    targets_key: str,
    online_key: str,
    plain_http: bool | None,
    as_json: bool,
) -> None:
    """Push signed bundles as OCI artifacts and sign them into a new release (TUF targets)."""
    from trtbuild.bundle.signing import load_public_key
    from trtbuild.fleet.keys import signer
    from trtbuild.fleet.publish import publish
    from trtbuild.fleet.repository import RoleKeys

    keys = RoleKeys([], signer(targets_key), signer(online_key))
    version, done = publish(
        _registry(registry, plain_http), [Path(b) for b in bundles], load_public_key(pub), keys
    )
    if as_json:
        emit_json({"targets_version": version, "published": [p.__dict__ for p in done]})
        return
    table = Table(title=f"release metadata v{version}")
    for col in ("target path", "tag", "digest", "bytes"):
        table.add_column(col)
    for p in done:
        table.add_row(p.path, p.tag, p.digest[:19], str(p.length))
    out.print(table)


@fleet.command("refresh")
@click.option("--registry", required=True, help=_REGISTRY_HELP)
@click.option("--online-key", required=True, type=click.Path(dir_okay=False), help="Snapshot/timestamp key.")
@click.option("--hours", default=24.0, show_default=True, help="Timestamp lifetime.")
@click.option(
    "--repair",
    is_flag=True,
    help="The newest timestamp/snapshot is not validly signed (pushed with a leaked or wrong key): "
    "re-sign the newest release that is.",
)
@_plain_http_option
def refresh_cmd(registry: str, online_key: str, hours: float, repair: bool, plain_http: bool | None) -> None:
    """Re-sign snapshot and timestamp with the online key (run it well within the timestamp lifetime)."""
    from trtbuild.fleet.keys import signer
    from trtbuild.fleet.repository import refresh

    reg = _registry(registry, plain_http)
    version = refresh(reg, signer(online_key), timedelta(hours=hours), repair=repair)
    out.print(f"timestamp v{version} valid for {hours:g} h")


@fleet.command("rotate")
@click.option("--registry", required=True, help=_REGISTRY_HELP)
@click.option(
    "--root-key", "root_keys", required=True, multiple=True, type=click.Path(dir_okay=False),
    help="The current root key(s): enough to meet the current root threshold.",
)  # fmt: skip
@click.option(
    "--new-root-key", "new_root_keys", multiple=True, type=click.Path(dir_okay=False),
    help="Replace the root keys with these [keep the current ones].",
)  # fmt: skip
@click.option("--root-threshold", type=int, help="Root signatures required from now on [unchanged].")
@click.option("--new-targets-key", type=click.Path(dir_okay=False), help="Replace the targets key.")
@click.option(
    "--online-key", required=True, type=click.Path(dir_okay=False),
    help="The snapshot/timestamp key from now on (a new one replaces the current).",
)  # fmt: skip
@click.option("--out", "root_out", default="root.json", show_default=True, type=click.Path(dir_okay=False))
@_plain_http_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def rotate_cmd(
    registry: str,
    root_keys: tuple[str, ...],
    new_root_keys: tuple[str, ...],
    root_threshold: int | None,
    new_targets_key: str | None,
    online_key: str,
    root_out: str,
    plain_http: bool | None,
    as_json: bool,
) -> None:
    """Sign a new root version: replace leaked or lost keys, or renew root's expiry (devices follow the
    root chain by themselves; root.json written to --out is the trust anchor for new devices)."""
    from trtbuild.fleet.keys import signer
    from trtbuild.fleet.rotate import rotate

    done = rotate(
        _registry(registry, plain_http),
        [signer(k) for k in root_keys],
        signer(online_key),
        Path(root_out),
        new_root_keys=[signer(k) for k in new_root_keys],
        root_threshold=root_threshold,
        new_targets=signer(new_targets_key) if new_targets_key else None,
    )
    if as_json:
        emit_json(
            {
                "root_version": done.root_version,
                "rotated": list(done.rotated),
                "targets_version": done.targets_version,
                "root": str(done.root_path),
            }
        )
        return
    what = ", ".join(done.rotated) or "no keys (expiry renewed)"
    out.print(
        f"root v{done.root_version} signed: rotated {what}; new devices' trust anchor: {done.root_path}"
    )


@fleet.command("update")
@click.option("--registry", required=True, help=_REGISTRY_HELP)
@click.option("--install-root", required=True, type=click.Path(file_okay=False))
@click.option("--pub", required=True, type=click.Path(dir_okay=False), help="Bundle signing public key.")
@click.option("--root", "trust_root", type=click.Path(dir_okay=False), help="root.json (first run only).")
@click.option("--device", default="auto", show_default=True, help="auto, or the target id of this device.")
@click.option("--model", help="Only this model.")
@click.option("--version", help="Install exactly this version (also to go back on purpose).")
@click.option("--keep", default=3, show_default=True, help="Installed versions to keep.")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds a registry may stay silent.")
@_plain_http_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def update_cmd(
    registry: str,
    install_root: str,
    pub: str,
    trust_root: str | None,
    device: str,
    model: str | None,
    version: str | None,
    keep: int,
    timeout: float,
    plain_http: bool | None,
    as_json: bool,
) -> None:
    """Device agent: verify the newest release through TUF and its signature, install it, switch `current`."""
    from trtbuild.bundle.signing import load_public_key
    from trtbuild.fleet.agent import update

    result = update(
        _registry(registry, plain_http, timeout),
        Path(install_root),
        load_public_key(pub),
        device=device,
        model=model,
        version=version,
        trust_root=Path(trust_root) if trust_root else None,
        keep=keep,
        deadline_s=max(timeout * 20, 60.0),
    )
    if as_json:
        emit_json(result.to_json())
        return
    out.print(f"{result.result}: {result.release} ({result.engine}: {result.reason})")


@fleet.command("rollback")
@click.option("--install-root", required=True, type=click.Path(file_okay=False))
@click.option("--to", help="Installed version name to switch to [the previous one].")
def rollback_cmd(install_root: str, to: str | None) -> None:
    """Switch `current` back to the previous installed version."""
    from trtbuild.fleet.agent import rollback

    out.print(f"current -> {rollback(Path(install_root), to)}")


@fleet.command("status")
@click.option("--install-root", required=True, type=click.Path(file_okay=False))
@click.option("--verify", is_flag=True, help="Re-hash `current` and re-run its smoke test.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status_cmd(install_root: str, verify: bool, as_json: bool) -> None:
    """Installed, pending and refused releases, with reasons."""
    from trtbuild.fleet import install, state
    from trtbuild.fleet.agent import verify_current

    root = Path(install_root)
    st = state.load(root)
    cur = install.current_name(root)
    checked = verify_current(root) if verify else None
    if as_json:
        emit_json({"current": cur, "verified": checked, **st.to_json()})
        return
    table = Table(title=f"{root}: current = {cur or 'none'}")
    for col in ("version", "engine", "smoke", "installed"):
        table.add_column(col)
    for v in st.versions:
        mark = " (current)" if v.name == cur else ""
        table.add_row(v.name + mark, f"{v.engine}: {v.engine_reason}", v.smoke, v.installed_at)
    out.print(table)
    events = Table(title="recent events")
    for col in ("time", "release", "result", "reason"):
        events.add_column(col)
    for e in st.events[-10:]:
        events.add_row(e["time"], e["release"], e["result"], e["reason"])
    out.print(events)
    if checked:
        out.print(f"current verified: {checked}")


COMMANDS = [fleet]

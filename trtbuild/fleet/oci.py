"""The OCI registry side, through the `oras` SDK: bundles and TUF metadata files are OCI artifacts.

Credentials come from the usual Docker config (``~/.docker/config.json``, read by oras) or from
``TRTBUILD_REGISTRY_USER`` / ``TRTBUILD_REGISTRY_PASSWORD``; never from the command line.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import oras.client
import oras.provider
import requests
from requests.adapters import HTTPAdapter

from trtbuild.core.errors import TrtbuildError

BUNDLE_MEDIA_TYPE = "application/vnd.trtbuild.bundle.v1.tar+gzip"
BUNDLE_CONFIG_MEDIA_TYPE = "application/vnd.trtbuild.bundle.config.v1+json"  # the artifact type
TUF_MEDIA_TYPE = "application/vnd.tuf.metadata.v1+json"
TUF_CONFIG_MEDIA_TYPE = "application/vnd.trtbuild.tuf.config.v1+json"
_REF = re.compile(r"(?P<host>[A-Za-z0-9.-]+(?::\d{1,5})?)/(?P<repo>[a-z0-9]+(?:[._/-][a-z0-9]+)*)")
_TAG_BAD = re.compile(r"[^A-Za-z0-9_.-]")
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
DEFAULT_TIMEOUT_S = 30.0
TRANSIENT_STATUS = (500, 502, 503, 504)
TRANSIENT_PAUSES_S = (0.2, 0.5)  # a manifest read is asked twice more after a transient answer


class TimeoutAdapter(HTTPAdapter):
    """Every request gets a connect and read time-out: a stalled registry fails, it does not hang."""

    def __init__(self, timeout: float) -> None:
        super().__init__(max_retries=0)
        self.timeout = timeout

    def send(self, request: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout
        return super().send(request, **kwargs)


class _Client(oras.client.OrasClient):
    """oras without its retry loop (up to 2 minutes of sleeps): the agent reports and retries later."""

    def do_request(self, *args: Any, **kwargs: Any) -> requests.Response:
        return oras.provider.Registry.do_request.__wrapped__(self, *args, **kwargs)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Registry:
    host: str  # HOST[:PORT]
    repo: str
    plain_http: bool
    timeout: float = DEFAULT_TIMEOUT_S

    def ref(self, tag: str) -> str:
        return f"{self.host}/{self.repo}:{tag}"


def parse_registry(text: str, plain_http: bool | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> Registry:
    """``HOST[:PORT]/REPO`` -> Registry; plain HTTP by default only on loopback."""
    match = _REF.fullmatch(text.strip())
    if not match:
        raise TrtbuildError(
            f"registry '{text}' is not HOST[:PORT]/REPO", "pass e.g. --registry 127.0.0.1:5000/fleet/models"
        )
    host = match["host"]
    local = host.rsplit(":", 1)[0] in LOOPBACK
    return Registry(host, match["repo"], local if plain_http is None else plain_http, timeout)


def tag_for(*parts: str) -> str:
    """An OCI tag from free text: allowed characters only, at most 128."""
    return _TAG_BAD.sub("_", "-".join(parts))[:128]


def client(reg: Registry) -> oras.client.OrasClient:
    cli = _Client(hostname=reg.host, insecure=reg.plain_http)
    adapter = TimeoutAdapter(reg.timeout)
    cli.session.mount("http://", adapter)
    cli.session.mount("https://", adapter)
    user, password = os.environ.get("TRTBUILD_REGISTRY_USER"), os.environ.get("TRTBUILD_REGISTRY_PASSWORD")
    if user and password:
        cli.set_basic_auth(user, password)
    return cli


def registry_error(reg: Registry, exc: BaseException) -> TrtbuildError:
    if isinstance(exc, requests.Timeout):
        return TrtbuildError(
            f"registry {reg.host} did not answer within {reg.timeout:g} s (slow retrieval)",
            "check the registry or its mirror and retry",
        )
    return TrtbuildError(
        f"registry {reg.host} failed: {type(exc).__name__}: {str(exc)[:200]}",
        "check that the registry runs and --registry names it",
    )


def push_file(
    reg: Registry,
    path: Path,
    tag: str,
    media_type: str,
    config_media_type: str,
    annotations: Mapping[str, str],
) -> str:
    """Push one file as a single-layer OCI artifact under ``tag``; return the layer digest."""
    cli = client(reg)
    with tempfile.TemporaryDirectory(prefix="trtbuild-oci-") as tmp:
        config = Path(tmp) / "config.json"
        config.write_text("{}")
        try:
            response = cli.push(
                target=reg.ref(tag),
                files=[f"{path}:{media_type}"],
                manifest_config=f"{config}:{config_media_type}",
                manifest_annotations=dict(annotations),
                disable_path_validation=True,
                quiet=True,
            )
        except (requests.RequestException, ValueError, OSError) as exc:
            raise registry_error(reg, exc) from exc
    if response.status_code not in (200, 201):
        raise TrtbuildError(f"registry refused {reg.ref(tag)}: HTTP {response.status_code}", "check access")
    return layer_digest(reg, tag)


def manifest(reg: Registry, tag: str) -> dict[str, Any] | None:
    """The artifact manifest under ``tag``, or None when there is no such tag."""
    cli = client(reg)
    container = cli.get_container(reg.ref(tag))
    url = f"{cli.prefix}://{container.manifest_url()}"
    headers = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    for pause in (*TRANSIENT_PAUSES_S, None):
        try:
            response = cli.do_request(url, "GET", headers=headers)
        except requests.RequestException as exc:
            raise registry_error(reg, exc) from exc
        if response.status_code not in TRANSIENT_STATUS or pause is None:
            break
        time.sleep(pause)  # Distribution answers 500 while two publishers write one tag: ask again
    if response.status_code == 404:
        return None
    if response.status_code != 200:
        raise TrtbuildError(
            f"registry answered HTTP {response.status_code} for {reg.ref(tag)}", "check access"
        )
    doc: dict[str, Any] = json.loads(response.content)
    return doc


def layer_digest(reg: Registry, tag: str) -> str:
    doc = manifest(reg, tag)
    if doc is None or len(doc.get("layers") or []) != 1:
        raise TrtbuildError(f"{reg.ref(tag)} is not a one-file trtbuild artifact", "publish it again")
    return str(doc["layers"][0]["digest"])


@dataclass
class HTTPStatusError(Exception):
    status: int


def stream_blob(reg: Registry, digest: str) -> Iterator[bytes]:
    """Stream a blob by digest; the caller bounds its length and checks its hash (TUF does both)."""
    cli = client(reg)
    container = cli.get_container(reg.ref("x"))
    response = cli.get_blob(container, digest, stream=True)
    with response:
        if response.status_code != 200:
            raise HTTPStatusError(response.status_code)
        yield from response.iter_content(chunk_size=64 << 10)

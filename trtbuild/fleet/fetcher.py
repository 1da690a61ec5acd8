"""python-tuf's network layer over the OCI registry: metadata files by tag, target files by the content
digest in their (hash-prefixed, consistent-snapshot) name. TUF bounds every length and checks every hash;
this adds a time-out per read and a deadline per file against slow-retrieval attacks."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import requests
from tuf.api import exceptions
from tuf.ngclient import FetcherInterface

from trtbuild.fleet import metadata_store, oci

META_BASE = "oci://metadata/"
TARGET_BASE = "oci://targets/"
_HASHED = re.compile(r"([0-9a-f]{64})\.[^/]+")


class OciFetcher(FetcherInterface):
    def __init__(self, reg: oci.Registry, deadline_s: float) -> None:
        self.reg = reg
        self.deadline_s = deadline_s
        self.bytes_read = 0

    def _digest(self, url: str) -> str:
        if url.startswith(META_BASE):
            tag = metadata_store.tag_for_filename(url[len(META_BASE) :])
            if tag is None:
                raise exceptions.DownloadHTTPError(f"no such metadata {url}", 404)
            doc = oci.manifest(self.reg, tag)
            if doc is None or len(doc.get("layers") or []) != 1:
                raise exceptions.DownloadHTTPError(f"{tag} not in the registry", 404)
            return str(doc["layers"][0]["digest"])
        if url.startswith(TARGET_BASE):
            match = _HASHED.fullmatch(url.rsplit("/", 1)[-1])
            if match:
                return f"sha256:{match[1]}"
        raise exceptions.DownloadHTTPError(f"not a fleet URL: {url}", 404)

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            digest = self._digest(url)
        except requests.Timeout as exc:
            raise exceptions.SlowRetrievalError(f"registry stalled on {url}") from exc
        return self._stream(url, digest)

    def _stream(self, url: str, digest: str) -> Iterator[bytes]:
        start = time.monotonic()
        try:
            for chunk in oci.stream_blob(self.reg, digest):
                self.bytes_read += len(chunk)
                yield chunk
                if time.monotonic() - start > self.deadline_s:
                    raise exceptions.SlowRetrievalError(f"{url} took over {self.deadline_s:g} s")
        except requests.Timeout as exc:
            raise exceptions.SlowRetrievalError(f"registry stalled on {url}") from exc
        except oci.HTTPStatusError as exc:
            raise exceptions.DownloadHTTPError(f"{url}: HTTP {exc.status}", exc.status) from exc
        except requests.RequestException as exc:
            raise exceptions.DownloadError(f"{url}: {exc}") from exc

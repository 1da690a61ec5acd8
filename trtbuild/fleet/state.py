"""The device's install record (``state.json`` under the install root, written atomically): installed
versions in install order, which one is current, and recent events (installed, pending, refused, rolled
back) with their reasons, for `fleet status`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from trtbuild.core import atomic

STATE = "state.json"
MAX_EVENTS = 100


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Installed:
    name: str  # the bundle name: model-version-target-precision
    model: str
    version: str
    target: str
    target_path: str  # in the TUF targets metadata
    sha256: str
    engine: str  # built | pending | n/a
    engine_reason: str
    smoke: str
    installed_at: str = field(default_factory=now)


@dataclass
class State:
    versions: list[Installed] = field(default_factory=list)  # install order, oldest first
    events: list[dict[str, str]] = field(default_factory=list)

    def find(self, name: str) -> Installed | None:
        return next((v for v in self.versions if v.name == name), None)

    def event(self, release: str, result: str, reason: str) -> None:
        self.events.append({"time": now(), "release": release, "result": result, "reason": reason})
        del self.events[:-MAX_EVENTS]

    def to_json(self) -> dict[str, Any]:
        return {"versions": [asdict(v) for v in self.versions], "events": self.events}


def load(root: Path) -> State:
    path = root / STATE
    if not path.is_file():
        return State()
    doc = json.loads(path.read_text())
    return State([Installed(**v) for v in doc.get("versions", [])], list(doc.get("events", [])))


def save(root: Path, state: State) -> None:
    atomic.write_text(root / STATE, json.dumps(state.to_json(), indent=2) + "\n")

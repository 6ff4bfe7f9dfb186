"""The run folder: what a run leaves on disk, written so that nothing half-done looks done.

Layout: `scenario.yaml` (resolved), `events.jsonl` (one event per line, flushed each
round), `report.json` and `report.md` (written last, atomically), `controls.json` (the
control prompts in use). While a run is going, or after it was interrupted or failed,
the folder holds `INCOMPLETE`, which says why; a finished run has no such file.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import IO

from pydantic import BaseModel

from collective.records import INCOMPLETE


def default_run_dir(scenario_name: str, root: Path = Path("runs")) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = root / f"{stamp}-{scenario_name}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def run_id_for(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", path.name)[:64]


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class RunDir:
    """An open run folder. Use as a context manager around the run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._events: IO[str] | None = None

    def open(self, resolved_scenario_yaml: str) -> RunDir:
        self.path.mkdir(parents=True, exist_ok=True)
        if (self.path / "report.json").exists():
            raise FileExistsError(f"{self.path} already holds a finished run; choose another --out")
        self.mark_incomplete("the run is in progress (or its process was killed)")
        write_atomic(self.path / "scenario.yaml", resolved_scenario_yaml)
        self._events = (self.path / "events.jsonl").open("w", encoding="utf-8")
        return self

    def mark_incomplete(self, reason: str) -> None:
        write_atomic(self.path / INCOMPLETE, reason.rstrip() + "\n")

    def event(self, record: BaseModel) -> None:
        assert self._events is not None, "open() the run folder first"
        self._events.write(record.model_dump_json() + "\n")
        self._events.flush()

    def write_json(self, name: str, payload: BaseModel | dict) -> None:
        text = payload.model_dump_json(indent=2) if isinstance(payload, BaseModel) else json.dumps(payload, indent=2)
        write_atomic(self.path / name, text + "\n")

    def write_text(self, name: str, text: str) -> None:
        write_atomic(self.path / name, text)

    def finish(self) -> None:
        (self.path / INCOMPLETE).unlink(missing_ok=True)

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None


def is_complete(path: Path) -> bool:
    return (path / "report.json").exists() and not (path / INCOMPLETE).exists()

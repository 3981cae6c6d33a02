"""Per-image results on disk, so that an interrupted evaluation can resume with the same final numbers.

One JSON line per scored (or skipped) image, appended and flushed as soon as the image is done, in
one file per process (`records/part-<rank>-of-<world>.jsonl`). A run killed mid-line leaves a torn
last line: it is ignored when read and cut off before the next append, so nothing half-written counts.
`settings.json` beside them holds the settings; resuming under other settings is refused.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np


class RecordError(ValueError):
    """The output folder holds results that cannot be resumed under these settings."""


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to `path` through a temporary file and a rename (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, path)


class RecordStore:
    """The per-image results of one evaluation under `folder`."""

    def __init__(self, folder: Path, settings: dict, *, rank: int = 0, world: int = 1, resume: bool = False):
        self.folder = Path(folder)
        self.records_dir = self.folder / "records"
        self.settings = settings
        self.path = self.records_dir / f"part-{rank}-of-{world}.jsonl"
        settings_path = self.folder / "settings.json"
        if resume and settings_path.is_file():
            saved = json.loads(settings_path.read_text())
            if saved != json.loads(json.dumps(settings)):
                changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
                raise RecordError(f"{self.folder} holds results of a run with other settings ({', '.join(changed)}); "
                                  "resume with the same settings, or choose another --output folder")
        self._resume = resume
        self._file = None

    def prepare(self, *, is_main: bool) -> int:
        """Fresh run: the main process clears earlier records (returns how many images they held);
        every run: settings written."""
        dropped = 0
        if is_main:
            if not self._resume and self.records_dir.is_dir():
                for old in self.records_dir.glob("*.jsonl"):
                    dropped += old.read_text().count("\n")
                    old.unlink()
            self.records_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.folder / "settings.json", self.settings)
        return dropped

    def load(self) -> dict[str, dict]:
        """id -> record of every complete line in every part file (the first record of an id wins)."""
        done: dict[str, dict] = {}
        if not self._resume or not self.records_dir.is_dir():
            return done
        for part in sorted(self.records_dir.glob("*.jsonl")):
            for line in part.read_text().splitlines(keepends=True):
                if not line.endswith("\n"):
                    break  # torn by a kill
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                done.setdefault(record["id"], record)
        return done

    def append(self, record: dict) -> None:
        if self._file is None:
            self.records_dir.mkdir(parents=True, exist_ok=True)
            _cut_torn_tail(self.path)
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _cut_torn_tail(path: Path) -> None:
    """Drop a last line without its newline (a write cut short)."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


def stats_to_json(stats: np.ndarray) -> list[list[int]]:
    return stats.astype(np.int64).tolist()


def stats_from_json(data, num_classes: int) -> Optional[np.ndarray]:
    array = np.asarray(data, dtype=np.int64)
    if array.shape != (3, num_classes):
        raise RecordError(f"a stored record has shape {array.shape}, expected (3, {num_classes})")
    return array

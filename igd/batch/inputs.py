"""What `igd batch` works on: (image, target) pairs from a directory, a glob or a manifest.

Every pair has a stable key, ``(id, target)``: the id is the image's path relative to
the input root (or the manifest's ``id`` column), the target what the user wrote. Keys
decide sharding (a hash, so N shards cover every pair once whatever order files are
listed in) and resuming. Output names come from the ids too, made safe: they never
leave the output directory (absolute ids, ``..``), and two pairs never share one
(``a.jpg`` and ``a.png`` keep their extensions when both are there).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import glob
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from igd.request import IMAGE_SUFFIXES

PREDICTED = "predicted"  # the target written when none is given: the predicted class


class InputError(ValueError):
    """The input cannot be read as images or a manifest; the message says why."""


@dataclass(frozen=True)
class Pair:
    """One unit of work: one image, one target."""

    id: str  # unique per image; the relative path unless a manifest says otherwise
    path: str  # where to read the image
    target: str  # a class name, an index, or PREDICTED
    output: str = ""  # the result's name under OUT_DIR, without the format's suffix

    @property
    def key(self) -> str:
        return f"{self.id}\t{self.target}"


def discover(source: str, targets: tuple[str, ...]) -> list[Pair]:
    """All pairs of ``source`` (a directory, a glob, or a .csv/.jsonl manifest), sorted.

    ``targets`` apply to images without targets of their own (directory and glob
    inputs, manifest rows without a ``target``); none means the predicted class.
    """
    path = Path(source)
    default_targets = list(targets) or [PREDICTED]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        pairs = [Pair(str(f.relative_to(path)), str(f), t) for f in files for t in default_targets]
    elif path.is_file() and path.suffix.lower() in (".csv", ".jsonl", ".json"):
        pairs = _manifest(path, default_targets)
    elif any(c in source for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
        root = Path(_glob_root(source))
        pairs = [Pair(str(f.relative_to(root)), str(f), t) for f in files for t in default_targets]
    elif path.is_file():
        pairs = [Pair(path.name, str(path), t) for t in default_targets]
    else:
        raise InputError(f"{source}: no such directory, manifest or image, and no glob matches")
    if not pairs:
        raise InputError(f"{source}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))})")
    keys = [pair.key for pair in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(k for k in keys if keys.count(k) > 1).replace("\t", " / ")
        raise InputError(f"{source}: the pair {duplicate} appears twice; ids and targets must be unique together")
    return name_outputs(sorted(pairs, key=lambda pair: pair.key))


def name_outputs(pairs: list[Pair]) -> list[Pair]:
    """Give each pair its output name: ``cats/001.png`` attributed to ``cat`` becomes
    ``cats/001.cat``. Ids are made safe (no absolute paths, no ``..``, no control
    characters); images whose names would collide keep their extension (``a.jpg.cat``,
    ``a.png.cat``), and any that still collide get ``~2``, ``~3``, ... in key order.
    Deterministic for a given input, so shards and resumed runs agree."""
    wanted = [_safe_path(PurePosixPath(*_safe_parts(pair.id)).with_suffix("")) + "." + _safe_target(pair.target)
              for pair in pairs]
    images_per_name: dict[str, set[str]] = collections.defaultdict(set)
    for pair, name in zip(pairs, wanted):
        images_per_name[name].add(pair.id)
    taken: set[str] = set()
    named = []
    for pair, name in zip(pairs, wanted):
        if len(images_per_name[name]) > 1:
            name = _safe_path(PurePosixPath(*_safe_parts(pair.id))) + "." + _safe_target(pair.target)
        candidate, number = name, 1
        while candidate in taken:
            number += 1
            candidate = f"{name}~{number}"
        taken.add(candidate)
        named.append(dataclasses.replace(pair, output=candidate))
    return named


def _safe_parts(image_id: str) -> list[str]:
    """The folders and name of an id, none of them empty, ``.``, ``..`` or with control
    characters: whatever the id, the result stays below the output directory."""
    parts = []
    for part in re.split(r"[/\\]+", image_id):
        part = re.sub(r"[\x00-\x1f\x7f]", "_", part)
        if part in ("", "."):
            continue
        parts.append("__" if part == ".." else part)
    return parts or ["_"]


def _safe_path(path: PurePosixPath) -> str:
    return str(path) if path.name else "_"


def _safe_target(target: str) -> str:
    return re.sub(r"[^\w.-]+", "_", target)


def in_shard(pair: Pair, shard: tuple[int, int] | None) -> bool:
    """Whether ``pair`` belongs to shard I of N (1-based); None means every pair."""
    if shard is None:
        return True
    index, count = shard
    digest = hashlib.sha256(pair.key.encode()).digest()
    return int.from_bytes(digest[:8], "big") % count == index - 1


def _manifest(path: Path, default_targets: list[str]) -> list[Pair]:
    """Rows with ``path``, optional ``target`` (one, or several separated by ``|`` in CSV,
    a list in JSON lines) and optional ``id``. Relative paths are relative to the manifest."""
    rows = _rows(path)
    pairs = []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not row.get("path"):
            raise InputError(f"{path}, row {number}: every row needs a path")
        image = Path(str(row["path"]))
        if not image.is_absolute():
            image = path.parent / image
        raw_targets = row.get("target")
        if raw_targets in (None, "", []):
            row_targets = default_targets
        elif isinstance(raw_targets, list):
            row_targets = [str(t) for t in raw_targets]
        else:
            row_targets = [t.strip() for t in str(raw_targets).split("|") if t.strip()]
        image_id = str(row.get("id") or row["path"])
        pairs += [Pair(image_id, str(image), target) for target in row_targets]
    return pairs


def _rows(path: Path) -> list[object]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read the manifest ({error})") from None
    if path.suffix.lower() == ".csv":
        return list(csv.DictReader(text.splitlines()))
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: line {error.lineno} is not JSON ({error.msg})") from None


def _glob_root(pattern: str) -> str:
    """The directory part of a glob before its first wildcard: ids are relative to it."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if any(c in part for c in "*?["):
            break
        fixed.append(part)
    return str(Path(*fixed)) if fixed else "."

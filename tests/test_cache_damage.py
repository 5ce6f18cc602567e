"""The chunk-size cache cannot stop igd: whatever is in chunk-sizes.json (or in its place),
reading it ends at once with "search again" and a warning saying why, and the next
measurement still writes a clean file over it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from daemon import Igd, short_tempdir
from igd.tuning.cache import ChunkCache
from igd.tuning.search import ChunkChoice

KEY = "model|3x32x32|cpu|threads=2"
OTHER = "another model|3x32x32|cpu|threads=2"
CHOICE = ChunkChoice(8, {2: 0.05, 4: 0.045, 8: 0.04, 16: 0.041}, 12_000_000, 64, 7.6, "2026-12-03T18:00:00Z", 0.0, 2)
SOUND = CHOICE.to_json()
NOBODY = 65534


def entries(entry: object, other: object = SOUND) -> str:
    """A cache file whose entry for KEY is ``entry`` (raw JSON text when a str) beside a sound one."""
    text = entry if isinstance(entry, str) else json.dumps(entry)
    return '{"%s": %s, "%s": %s}' % (KEY, text, OTHER, json.dumps(other))


def field(**changes: object) -> str:
    return entries({**SOUND, **changes})


def write(text: str | bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(text.encode() if isinstance(text, str) else text)


def big_file(path: Path) -> None:
    with path.open("wb") as f:
        f.write(entries(SOUND).encode())
        f.truncate(100 * 2**20)  # 100 MB (sparse: the test writes no 100 MB)


def give_to_nobody(path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    os.chown(path, NOBODY, NOBODY)


def owned_by_nobody(path: Path) -> None:
    path.write_text(entries(SOUND))
    give_to_nobody(path)


def world_writable(path: Path) -> None:
    path.write_text(entries(SOUND))
    os.chmod(path, 0o666)


# What damages the whole file: every entry is measured again.
FILE_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "infinite float": (write('{"%s": {"max_batch": 1e400}}' % KEY), "max_batch inf is not an integer"),
    "nested brackets": (write("[" * 100_000), "nested too deeply"),
    "nested in an entry": (write('{"%s": %s' % (KEY, "[" * 100_000)), "nested too deeply"),
    "100 MB": (big_file, "104,857,600 bytes; chunk caches may have up to 1,048,576"),
    "symlink to /dev/zero": (lambda path: path.symlink_to("/dev/zero"), "symbolic link"),
    "FIFO": (lambda path: os.mkfifo(path), "a FIFO"),
    "directory": (lambda path: path.mkdir(), "a directory"),
    "not JSON": (write('{"%s": {"max_batch": 8' % KEY), "not JSON"),
    "not UTF-8": (write(b'{"\xff\xfe": 1}'), "not JSON"),
    "a list": (write("[1, 2, 3]"), "holds a list, not an object"),
    "a huge integer": (write('{"%s": {"max_batch": %s}}' % (KEY, "9" * 5000)), "not JSON"),
    "another owner": (owned_by_nobody, f"belongs to uid {NOBODY}"),
    "writable by everyone": (world_writable, "writable by every user"),
}

# What damages only the entry for KEY: the other entry is kept.
ENTRY_DAMAGE: dict[str, tuple[str, str]] = {
    "entry a list": (entries([8]), "the entry is a list, not an object"),
    "max_batch a string": (field(max_batch="eight"), "max_batch is a string, not an integer"),
    "max_batch missing": (entries({"ms_per_point": {}}), "max_batch is null, not an integer"),
    "max_batch negative": (field(max_batch=-4), "max_batch -4 is outside"),
    "max_batch zero": (field(max_batch=0), "max_batch 0 is outside"),
    "max_batch huge": (field(max_batch=10**9), "max_batch 1000000000 is outside"),
    "max_batch bool": (field(max_batch=True), "max_batch is a boolean, not an integer"),
    "max_batch float": (field(max_batch=8.0), "max_batch 8.0 is not an integer"),
    "max_batch 1": (field(max_batch=1), "max_batch 1 (never taken from a cache"),
    "max_batch over its cap": (field(max_batch=32, memory_cap=16), "over its memory cap 16"),
    "NaN timing": (field(ms_per_point={"2": "NaN"}).replace('"NaN"', "NaN"), "ms_per_point[2] nan"),
    "infinite timing": (field(ms_per_point={"2": "Inf"}).replace('"Inf"', "Infinity"), "ms_per_point[2] inf"),
    "overflowing timing": (field(ms_per_point={"2": "x"}).replace('"x"', "1e400"), "ms_per_point[2] inf"),
    "negative timing": (field(ms_per_point={"2": -5}), "ms_per_point[2] is outside"),
    "timing a string": (field(ms_per_point={"2": "fast"}), "ms_per_point[2] is a string"),
    "timings a list": (field(ms_per_point=[1, 2]), "ms_per_point is a list"),
    "size not a number": (field(ms_per_point={"two": 5}), "has the size 'two'"),
    "size zero": (field(ms_per_point={"0": 5}), "has the size '0'"),
    "NaN search seconds": (field(search_s="x").replace('"x"', "NaN"), "search_s nan"),
    "infinite memory": (field(mb_per_point="x").replace('"x"', "-Infinity"), "mb_per_point -inf"),
    "cap a string": (field(memory_cap="64"), "memory_cap is a string"),
    "threads a bool": (field(search_threads=False), "search_threads is a boolean"),
    "measured a number": (field(measured=5), "measured is a number"),
}


@pytest.fixture
def warnings() -> Iterator[list[logging.LogRecord]]:
    """The igd logger's records at warning level and above, whatever configured it."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("igd")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def get_within(cache: ChunkCache, key: str, seconds: float = 10.0) -> ChunkChoice | None:
    """cache.get(key) on a thread; fails the test if it has not returned within ``seconds``
    (a FIFO opened for reading would block it for good)."""
    answer: list[ChunkChoice | None] = []
    thread = threading.Thread(target=lambda: answer.append(cache.get(key)), daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"ChunkCache.get blocked for {seconds} s"
    assert time.monotonic() - started < seconds
    return answer[0]


def fields(record: logging.LogRecord) -> dict[str, object]:
    return getattr(record, "fields", {})


def check_searches_again(cache: ChunkCache, warnings: list[logging.LogRecord], reason: str) -> None:
    assert get_within(cache, KEY) is None
    ignored = [r for r in warnings if r.getMessage() == "chunk_cache_ignored"]
    assert len(ignored) == 1 and ignored[0].levelno == 30, warnings
    assert reason in str(fields(ignored[0])["reason"]), fields(ignored[0])
    assert fields(ignored[0])["path"] == str(cache.path)


def check_put_writes_a_clean_file(cache: ChunkCache, warnings: list[logging.LogRecord]) -> None:
    warnings.clear()
    cache.put(KEY, CHOICE)
    assert not warnings, [fields(r) for r in warnings]
    info = os.lstat(cache.path)
    assert os.path.isfile(cache.path) and not os.path.islink(cache.path)
    assert info.st_uid == os.geteuid() and not info.st_mode & 0o022, oct(info.st_mode)
    assert get_within(cache, KEY) == CHOICE and not warnings


@pytest.mark.parametrize("case", sorted(FILE_DAMAGE))
def test_a_damaged_cache_file_means_search_again_and_is_replaced(tmp_path: Path, warnings: list, case: str) -> None:
    damage, reason = FILE_DAMAGE[case]
    cache = ChunkCache(tmp_path)
    damage(cache.path)
    check_searches_again(cache, warnings, reason)
    check_put_writes_a_clean_file(cache, warnings)


@pytest.mark.parametrize("case", sorted(ENTRY_DAMAGE))
def test_a_damaged_entry_means_search_again_and_the_sound_ones_stay(tmp_path: Path, warnings: list,
                                                                    case: str) -> None:
    text, reason = ENTRY_DAMAGE[case]
    cache = ChunkCache(tmp_path)
    cache.path.write_text(text)
    check_searches_again(cache, warnings, reason)
    assert get_within(cache, OTHER) == CHOICE  # the rest of the file is still good
    check_put_writes_a_clean_file(cache, warnings)
    assert get_within(cache, OTHER) == CHOICE and set(json.loads(cache.path.read_text())) == {KEY, OTHER}


def test_damaged_entries_of_other_models_are_dropped_when_the_file_is_rewritten(tmp_path: Path,
                                                                              warnings: list) -> None:
    cache = ChunkCache(tmp_path)
    cache.path.write_text(entries(SOUND, other={**SOUND, "max_batch": 1}))
    assert get_within(cache, KEY) == CHOICE and not warnings  # the damage elsewhere does not matter
    cache.put("third", CHOICE)
    assert set(json.loads(cache.path.read_text())) == {KEY, "third"}


@pytest.mark.parametrize("folder", ["another owner", "writable by everyone"])
def test_a_cache_folder_others_could_write_is_neither_read_nor_written(tmp_path: Path, warnings: list,
                                                                       folder: str) -> None:
    directory = tmp_path / "cache"
    directory.mkdir()
    cache = ChunkCache(directory)
    cache.put(KEY, CHOICE)
    if folder == "another owner":
        give_to_nobody(directory)
    else:
        os.chmod(directory, 0o777)
    check_searches_again(cache, warnings, "belongs to uid" if folder == "another owner" else "writable by every")
    before = cache.path.read_bytes()
    warnings.clear()
    cache.put(KEY, ChunkChoice(4, {4: 0.01}))  # refused, logged, no exception
    assert [r.getMessage() for r in warnings] == ["chunk_cache_unwritable"]
    assert cache.path.read_bytes() == before


def test_a_search_that_chose_1_is_not_cached_and_a_missing_file_is_no_damage(tmp_path: Path,
                                                                             warnings: list) -> None:
    cache = ChunkCache(tmp_path / "not yet")
    assert get_within(cache, KEY) is None and not warnings  # nothing cached yet: no warning
    cache.put(KEY, ChunkChoice(1, {1: 0.5}, memory_cap=1))
    assert not cache.path.exists() and not warnings
    cache.put(KEY, CHOICE)
    assert get_within(cache, KEY) == CHOICE and not cache.directory.stat().st_mode & 0o022


def test_the_cache_stays_under_its_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ChunkCache, "LIMIT", 3000)
    cache = ChunkCache(tmp_path)
    for day in range(1, 20):
        cache.put(f"model {day}", ChunkChoice(8, {8: 0.04}, measured=f"2026-12-{day:02d}T00:00:00Z"))
        assert cache.path.stat().st_size <= 3000
    kept = sorted(json.loads(cache.path.read_text()))
    assert "model 19" in kept and "model 1" not in kept and len(kept) > 3  # the oldest went first


@pytest.mark.slow  # a daemon of its own and its chunk search
def test_igd_starts_with_a_fifo_for_a_cache_and_says_why_it_measured(fixtures: Path) -> None:
    """Before: warm-up opened the FIFO and waited for a writer for good (SIGTERM could
    not end it), and systemd restarted it in a loop."""
    cache_dir = short_tempdir()
    try:
        os.mkfifo(cache_dir / "chunk-sizes.json")
        with Igd("-bp", str(fixtures / "bit-tiny.pth"), env={"IGD_CACHE_DIR": str(cache_dir)},
                 ready_timeout=240) as igd:
            log = igd.log()
            assert "event=chunk_cache_ignored" in log, log
            line = next(line for line in log.splitlines() if "event=chunk_cache_ignored" in line)
            assert "level=warning" in line and "is a FIFO" in line and "note=" in line
            assert "chunk_source=measured" in log
        cached = json.loads((cache_dir / "chunk-sizes.json").read_text())  # the FIFO was replaced by the answer
        assert len(cached) == 1 and next(iter(cached.values()))["max_batch"] >= 2
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)

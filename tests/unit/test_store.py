"""Unit tests for `common.kvstore`: `SqliteKV` on a temporary directory (durability across
close and reopen, rollback of what was not committed), and one contract that `MemoryKV`
and `SqliteKV` both keep."""

from __future__ import annotations

import sqlite3
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from common.errors import StoreError
from common.kvstore import WAL_SIZE_LIMIT, CommitStats, MemoryKV, SqliteKV, decode_record
from common.store_health import StoreHealth
from common.store_metrics import StoreCollector

Store = MemoryKV | SqliteKV


def contents(store: Store) -> dict[str, Any]:
    return dict(store.items())


# ---------------------------------------------------------------------------- SqliteKV


def test_sqlite_keeps_committed_data_across_reopen(tmp_path: Path) -> None:
    store = SqliteKV(tmp_path, "node")
    store.apply({"t:1": ["spec", False, None], "m:counters": [1, 2, 3]})
    store.commit()
    store.close()
    again = SqliteKV(tmp_path, "node")
    try:
        assert contents(again) == {"t:1": ["spec", False, None], "m:counters": [1, 2, 3]}
    finally:
        again.close()


def test_sqlite_rolls_back_uncommitted_writes_on_close(tmp_path: Path) -> None:
    store = SqliteKV(tmp_path, "node")
    store.apply({"kept": 1})
    store.commit()
    store.apply({"lost": 2, "kept": None})
    store.close()
    again = SqliteKV(tmp_path, "node")
    try:
        assert contents(again) == {"kept": 1}
    finally:
        again.close()


def test_sqlite_file_is_private(tmp_path: Path) -> None:
    data_dir = tmp_path / "new" / "dir"
    store = SqliteKV(data_dir, "proxy")
    try:
        assert store.path == data_dir / "proxy.sqlite"
        assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    finally:
        store.close()


def test_sqlite_with_fsync(tmp_path: Path) -> None:
    store = SqliteKV(tmp_path, "node", fsync=True)
    store.apply({"a": 1})
    store.commit()
    store.close()
    again = SqliteKV(tmp_path, "node", fsync=True)
    try:
        assert contents(again) == {"a": 1}
    finally:
        again.close()


def test_sqlite_unopenable_directory_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="cannot open"):
        SqliteKV(blocker, "node")


def test_sqlite_reopen_is_a_fresh_connection(tmp_path: Path) -> None:
    store = SqliteKV(tmp_path, "node")
    store.apply({"a": 1})
    store.commit()
    store.apply({"b": 2})
    again = store.reopen()
    try:
        assert again is not store
        assert again.path == store.path
        assert contents(again) == {"a": 1}
    finally:
        again.close()


def poison(store: SqliteKV) -> None:
    """From now on a write of the key `poison` fails inside sqlite, as a statement that
    hits an I/O error or runs out of memory would: the statement is undone, and the
    transaction it is in stays open."""
    store._db.conn.execute(
        'CREATE TEMP TRIGGER poison BEFORE INSERT ON "records" WHEN NEW.key = \'poison\' '
        "BEGIN SELECT RAISE(ABORT, 'poisoned'); END")


@pytest.mark.parametrize("rows_per_statement", [None, 2])
def test_sqlite_a_failed_statement_commits_nothing_of_its_batch(
        tmp_path: Path, rows_per_statement: int | None) -> None:
    """A batch is whole or nothing for any failure, not only a full disk. Its writes and
    deletes were two statements: when the writes failed, the COMMIT kept the deletes
    (a committed record's delete reached the disk without the writes that replaced it).
    With 2 rows a statement the batch is three statements, and the failure is in the last."""
    store = SqliteKV(tmp_path, "node")
    if rows_per_statement is not None:
        store.rows_per_statement = rows_per_statement
    store.apply({"a": 1, "old": "kept"})
    store.commit()
    poison(store)
    store.apply({"a": 2, "b": 3, "old": None, "c": 4, "poison": 5})
    with pytest.raises(StoreError, match="poisoned"):
        store.commit()
    again = store.reopen()
    try:
        assert contents(again) == {"a": 1, "old": "kept"}
    finally:
        again.close()


def rows_in_file(store: SqliteKV) -> int:
    with sqlite3.connect(store.path) as db:
        count: int = db.execute('SELECT count(*) FROM "records"').fetchone()[0]
    return count


def test_sqlite_deleted_keys_leave_no_rows_behind(tmp_path: Path) -> None:
    """A delete is a NULL row until the next commit removes it, or the first commit after
    a restart when the process died before that."""
    store = SqliteKV(tmp_path, "node")
    store.apply({"a": 1, "b": 2, "c": 3})
    store.commit()
    store.apply({"a": None, "b": None, "d": 4})
    store.commit()
    assert contents(store) == {"c": 3, "d": 4}
    assert rows_in_file(store) == 4  # two of them tombstones
    store.apply({"e": 5})
    store.commit()
    assert rows_in_file(store) == 3
    store.apply({"c": None, "f": 6})
    store.commit()
    again = store.reopen()  # as after a kill -9: the tombstone of c is on disk
    try:
        assert contents(again) == {"d": 4, "e": 5, "f": 6}
        again.apply({"g": 7})
        again.commit()
        assert rows_in_file(again) == 4
    finally:
        again.close()


def test_sqlite_batches_of_many_statements_commit_whole(tmp_path: Path) -> None:
    store = SqliteKV(tmp_path, "node")
    store.rows_per_statement = 3
    store.apply({f"k{i}": i for i in range(10)})
    store.commit()
    store.apply({"k0": None, "k5": None, "k9": "new", "absent": None})
    store.commit()
    again = store.reopen()
    try:
        assert contents(again) == {**{f"k{i}": i for i in range(1, 9) if i != 5}, "k9": "new"}
        assert list(contents(again))[-1] == "k9"  # a rewritten key is the newest
    finally:
        again.close()


def test_sqlite_gives_back_the_room_a_big_batch_took_in_its_wal(tmp_path: Path) -> None:
    store = SqliteKV(tmp_path, "node")
    wal = tmp_path / "node.sqlite-wal"
    store.apply({f"t:{i}": "x" * 400 for i in range(50_000)})  # ~25 MB of pages
    store.commit()
    assert wal.stat().st_size > 2 * WAL_SIZE_LIMIT
    store.apply({"next": 1})  # the WAL restarts after the big batch's checkpoint
    store.commit()
    assert wal.stat().st_size <= WAL_SIZE_LIMIT
    assert len(contents(store)) == 50_001
    store.close()


# ---------------------------------------------------------------------------- the contract


@pytest.fixture(params=["memory", "sqlite"])
def make_store(request: pytest.FixtureRequest,
               tmp_path: Path) -> Iterator[Callable[[], Store]]:
    """A factory: each call opens the same store again (MemoryKV: the same object,
    reopened), as a restarted process would."""
    opened: list[SqliteKV] = []
    memory = MemoryKV()

    def make() -> Store:
        if request.param == "memory":
            return memory.reopen()
        store = SqliteKV(tmp_path, "contract")
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def test_contract_starts_empty(make_store: Callable[[], Store]) -> None:
    assert contents(make_store()) == {}


def test_contract_commit_then_reopen(make_store: Callable[[], Store]) -> None:
    store = make_store()
    store.apply({"a": 1, "b": "two", "c": [1, [2, None]], "d": {"k": b"\x00\xff"}})
    store.commit()
    store.close()
    assert contents(make_store()) == {"a": 1, "b": "two", "c": [1, [2, None]],
                                      "d": {"k": b"\x00\xff"}}


def test_contract_values_come_back_as_msgpack_does(make_store: Callable[[], Store]) -> None:
    store = make_store()
    store.apply({"tuple": (1, (2, 3)), "float": 1.5, "big": 2**53, "ints": {1: "one"}})
    store.commit()
    assert contents(store) == {"tuple": [1, [2, 3]], "float": 1.5, "big": 2**53,
                               "ints": {1: "one"}}


def test_contract_uncommitted_writes_are_lost(make_store: Callable[[], Store]) -> None:
    store = make_store()
    store.apply({"a": 1})
    store.commit()
    store.apply({"a": 2, "b": 3})
    store.close()
    assert contents(make_store()) == {"a": 1}


def test_contract_reopen_drops_uncommitted(make_store: Callable[[], Store]) -> None:
    store = make_store()
    store.apply({"a": 1})
    store.commit()
    store.apply({"b": 2, "a": None})
    again = store.reopen()
    assert contents(again) == {"a": 1}
    again.close()


def test_contract_overwrite_and_delete(make_store: Callable[[], Store]) -> None:
    store = make_store()
    store.apply({"a": 1, "b": 2, "c": 3})
    store.commit()
    store.apply({"a": 10, "b": None})
    store.commit()
    assert contents(store) == {"a": 10, "c": 3}


def test_contract_a_rewritten_key_keeps_its_place(make_store: Callable[[], Store]) -> None:
    """Records come back in the order of their first write, across commits and a reopen:
    a node's tickets in the order it issued them, though a result rewrites each one."""
    store = make_store()
    store.apply({"t:1": 1, "t:2": 2, "t:3": 3})
    store.commit()
    store.apply({"t:1": 10})
    store.commit()
    store.apply({"t:4": 4, "t:2": 20})
    store.commit()
    store.close()
    again = make_store()
    assert list(again.items()) == [("t:1", 10), ("t:2", 20), ("t:3", 3), ("t:4", 4)]
    assert [(key, decode_record(key, blob)) for key, blob in again.stored_items()] == list(
        again.items())


def test_a_stored_value_that_is_not_msgpack_is_a_store_error() -> None:
    with pytest.raises(StoreError, match="record t:x"):
        decode_record("t:x", b"\xc1")


def test_contract_delete_of_an_absent_key_is_fine(make_store: Callable[[], Store]) -> None:
    store = make_store()
    store.apply({"never": None})
    store.commit()
    store.apply({"a": 1})
    store.apply({"a": None, "again-never": None})
    store.commit()
    assert contents(store) == {}


def test_contract_later_apply_wins(make_store: Callable[[], Store]) -> None:
    store = make_store()
    store.apply({"a": 1})
    store.apply({"a": None})
    store.apply({"b": 1})
    store.apply({"b": 2})
    store.commit()
    assert contents(store) == {"b": 2}


def test_contract_one_commit_many_keys(make_store: Callable[[], Store]) -> None:
    store = make_store()
    store.apply({f"k:{i}": i for i in range(500)})
    store.commit()
    store.close()
    assert contents(make_store()) == {f"k:{i}": i for i in range(500)}


def test_contract_empty_apply_and_commit(make_store: Callable[[], Store]) -> None:
    store = make_store()
    store.apply({})
    store.commit()
    store.commit()
    assert contents(store) == {}


def test_memory_uncommitted_writes_are_invisible() -> None:
    store = MemoryKV()
    store.apply({"a": 1})
    assert contents(store) == {}
    store.commit()
    assert contents(store) == {"a": 1}
    assert store.stats.commits == 1


def test_memory_commit_copies_values() -> None:
    value = [1, 2]
    store = MemoryKV()
    store.apply({"a": value})
    store.commit()
    value.append(3)
    assert contents(store) == {"a": [1, 2]}


@pytest.mark.parametrize("kind", [
    "memory",
    "sqlite",
])
def test_contract_items_shows_only_committed_data(kind: str, tmp_path: Path) -> None:
    store: Store = MemoryKV() if kind == "memory" else SqliteKV(tmp_path, "contract")
    try:
        store.apply({"a": 1})
        store.commit()
        store.apply({"a": None, "b": 2})
        assert contents(store) == {"a": 1}
    finally:
        store.close()


def test_commit_stats_count_commits_records_and_failures(tmp_path: Path) -> None:
    store = SqliteKV(tmp_path, "node")
    store.apply({"a": 1, "b": 2})
    store.commit()
    store.apply({"a": None})
    store.commit()
    store.commit()  # nothing staged: no commit
    poison(store)
    store.apply({"poison": 1})
    with pytest.raises(StoreError):
        store.commit()
    again = store.reopen()
    try:
        assert again.stats is store.stats  # carried across the reopen
        again.apply({"c": 3})
        again.commit()
        stats = again.stats
        assert (stats.commits, stats.records, stats.failures) == (3, 4, 1)
        assert sum(stats.buckets) == 3 and stats.seconds > 0
    finally:
        again.close()


def test_the_store_collector_reports_a_cumulative_histogram() -> None:
    stats = CommitStats()
    for seconds in (0.00005, 0.0003, 0.0003, 0.02, 30.0):
        stats.observe(seconds, 2)
    health = StoreHealth("proxy")
    samples = {s.name + str(s.labels.get("le", "")): s.value
               for family in StoreCollector("djs_store", health, lambda: stats,
                                            lambda: 2).collect()
               for s in family.samples}
    assert samples["djs_store_healthy"] == 1
    assert samples["djs_store_commit_seconds_bucket0.0001"] == 1
    assert samples["djs_store_commit_seconds_bucket0.0005"] == 3
    assert samples["djs_store_commit_seconds_bucket0.025"] == 4
    assert samples["djs_store_commit_seconds_bucket5.0"] == 4
    assert samples["djs_store_commit_seconds_bucket+Inf"] == 5
    assert samples["djs_store_commit_seconds_count"] == 5
    assert samples["djs_store_commit_seconds_sum"] == pytest.approx(30.02065)
    assert samples["djs_store_records_committed_total"] == 10
    assert samples["djs_store_commit_failures_total"] == 0
    assert samples["djs_store_records_set_aside"] == 2

"""`djs salvage` on real sqlite files with a damaged page: what can be read is kept, in its
order, the keys the damage hid are named, and the damaged files are kept beside."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cluster_node.state import NodeState
from common.errors import DataDirInUse, StoreError
from common.jobs import JobId, JobSpec, NodeId
from common.kvstore import SALVAGE_LOST, SqliteKV, decode_record
from common.messages import PROTOCOL_VERSION, Hello, Job
from common.salvage import salvage
from reverse_proxy.records import ProxySettings
from reverse_proxy.state import ProxyState
from tests.stores import damage_page_holding

ME = NodeId("node-a")
TICKETS = 3000


def node_store(data_dir: Path) -> dict[str, bytes]:
    """A node's store with TICKETS pending tickets; its records as stored."""
    kv = SqliteKV(data_dir, "node")
    state = NodeState(ME, "inc-1", 2)
    kv.apply(state.initial_records())
    for n in range(TICKETS):
        state.submit(JobSpec(JobId(f"t{n:05d}"), "fib", (str(n),), ME, 1.7e9 + n))
    kv.apply(state.take_changes())
    kv.commit()
    records = dict(kv.stored_items())
    kv.close()
    return records


def stored(data_dir: Path) -> list[tuple[str, bytes]]:
    kv = SqliteKV(data_dir, "node")
    try:
        return list(kv.stored_items())
    finally:
        kv.close()


def test_a_sound_store_comes_through_whole_and_in_order(tmp_path: Path) -> None:
    before = node_store(tmp_path)
    report = salvage(tmp_path)
    assert (report.kept, report.lost_keys, report.lost_ranges) == (TICKETS + 1, [], [])
    assert stored(tmp_path) == list(before.items())
    assert report.damaged_copy is not None and report.damaged_copy.exists()
    assert not (tmp_path / ".salvage").exists()


def test_a_damaged_page_costs_its_rows_only_and_the_node_starts(tmp_path: Path) -> None:
    before = node_store(tmp_path)
    store = tmp_path / "node.sqlite"
    damage_page_holding(store, "t:t01500")
    damaged = SqliteKV(tmp_path, "node")
    with pytest.raises(StoreError, match=r"malformed.*djs salvage --data-dir"):
        NodeState.restore(damaged.stored_items(), 2)
    damaged.close()
    report = salvage(tmp_path)
    after = dict(stored(tmp_path))
    # what was read is the old store's, byte for byte, in its order
    read = [k for k in after if after[k] != SALVAGE_LOST]
    assert read == [k for k in before if k in read]
    assert all(after[k] == before[k] for k in read)
    assert 0 < len(before) - len(read) < 100  # one page of records (~40)
    # the keys the damage hid are named (the index is whole: every one of them)
    assert report.index_whole
    assert sorted(set(before) - set(read)) == report.lost_keys
    assert "t:t01500" in report.lost_keys
    assert all(after[k] == SALVAGE_LOST for k in report.lost_keys)
    # the node starts: those tickets are pending until the proxy says what it has
    state = NodeState.restore(iter(after.items()), 2)
    assert state is not None and len(state.tickets) == TICKETS
    assert len(state.set_aside) == len(report.lost_keys)
    assert state.tickets[JobId("t01500")].spec.job_type == "?"
    assert JobId("t01500") in state.awaited(TICKETS)


def test_a_file_that_is_no_store_is_left_as_it_was(tmp_path: Path) -> None:
    (tmp_path / "node.sqlite").write_bytes(b"this is not a database " * 200)
    with pytest.raises(StoreError, match=r"cannot read .* at all"):
        salvage(tmp_path)
    assert (tmp_path / "node.sqlite").read_bytes() == b"this is not a database " * 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.lock", "node.sqlite"]


def test_a_store_its_process_holds_is_not_touched(tmp_path: Path) -> None:
    node_store(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from common.datadir import claim; claim(Path(sys.argv[1]), 'node'); "
         "print('held', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(DataDirInUse, match="in use by another node"):
            salvage(tmp_path)
    finally:
        holder.kill()
        holder.communicate()
    assert not list(tmp_path.glob("*.damaged-*"))


def test_a_record_written_back_as_lost_says_so_when_read() -> None:
    with pytest.raises(StoreError, match="its page could not be read"):
        decode_record("t:x", SALVAGE_LOST)


def test_a_proxys_store_is_salvaged_too(tmp_path: Path) -> None:
    proxy = ProxyState("p", ProxySettings())
    kv = SqliteKV(tmp_path, "proxy")
    kv.apply(proxy.initial_records())
    proxy.on_hello(Hello(ME, "i1", 0, PROTOCOL_VERSION, (), (), ()), 0.0)
    proxy.on_message(ME, Job(tuple(JobSpec(JobId(f"j{n:05d}"), "fib", (str(n),), ME, 1.0)
                                   for n in range(2000))), 0.0)
    kv.apply(proxy.take_changes())
    kv.commit()
    kv.close()
    damage_page_holding(tmp_path / "proxy.sqlite", "j:j01000")
    report = salvage(tmp_path)
    assert "j:j01000" in report.lost_keys and report.damaged_copy is not None
    kv = SqliteKV(tmp_path, "proxy")
    again = ProxyState.restore(kv.stored_items(), ProxySettings(), 0.0)
    kv.close()
    assert again is not None and again.proxy_id == "p"
    assert len(again.jobs) == 2000 - len(report.lost_keys)  # those: UNKNOWN to their origin
    assert len(again.set_aside) == len(report.lost_keys)

"""A node whose store fails (`NodeService._recover`, `_probe_store`): one rollback, then
nothing staged (no submission, no cancel, no job start, no outcome recorded) until a probe
commit goes through; then everything resumes. A store in memory that fails on demand."""

from __future__ import annotations

import asyncio
import time

import pytest

from cluster_node.config import NodeConfig
from cluster_node.executor import executor_loop
from cluster_node.jobtypes import JobContext, load_job_types
from cluster_node.service import NodeService
from cluster_node.state import NodeState
from common import store_health
from common.errors import StoreError
from common.jobs import JobSpec, NodeId, new_job_id
from common.messages import Job
from common.store_health import PROBE_KEY
from tests.stores import FailingKV

NODE, ORIGIN = NodeId("n1"), NodeId("n2")
RETRY = 0.02


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_health, "RETRY_SECONDS", RETRY)


def make_service(store: FailingKV) -> NodeService:
    state = NodeState(NODE, "inc", slots=2)
    store.apply(state.initial_records())
    store.commit()
    service = NodeService(NodeConfig(), store, state, load_job_types(),
                          JobContext(NODE, False, 1.0, 1024, None))
    return service


def fail_a_commit(service: NodeService, store: FailingKV) -> None:
    store.broken = True
    service.submit("sleep", ("0",))
    with pytest.raises(StoreError):
        service.persist()


async def test_one_rollback_then_nothing_is_staged_until_the_store_is_back() -> None:
    store = FailingKV()
    service = make_service(store)
    fail_a_commit(service, store)
    assert store.reopens == 1 and not service.store_health.back.is_set()
    await asyncio.sleep(5 * RETRY)  # probes fail meanwhile: no rollback for them
    assert store.reopens <= 6 and service._failures == 1
    with pytest.raises(StoreError, match="failing on this node"):
        service.submit("sleep", ("0",))
    store.broken = False
    async with asyncio.timeout(2):
        await service.store_health.back.wait()
    assert PROBE_KEY not in dict(store.items())  # written, then deleted
    job_id = service.submit("sleep", ("0",))
    service.persist()
    assert f"t:{job_id}" in dict(store.items())


async def test_a_failure_soon_after_the_store_came_back_waits_longer() -> None:
    store = FailingKV()
    service = make_service(store)
    fail_a_commit(service, store)
    store.broken = False
    async with asyncio.timeout(2):
        await service.store_health.back.wait()
    fail_a_commit(service, store)
    assert service.store_health.retry == 2 * RETRY
    store.broken = False
    async with asyncio.timeout(2):
        await service.store_health.back.wait()


async def test_no_job_starts_and_no_outcome_is_recorded_while_the_store_fails() -> None:
    store = FailingKV()
    service = make_service(store)
    service.state.slots = 1
    executor = asyncio.create_task(executor_loop(service))
    try:
        first, second = (JobSpec(new_job_id(), "sleep", (ms,), ORIGIN, time.time())
                         for ms in ("100", "0"))
        service.state.on_message(Job((first, second)), time.time())
        service.persist()
        service.executor_wake.set()
        await asyncio.sleep(0.02)
        assert set(service.attempts) == {first.job_id}  # one slot: the second waits
        fail_a_commit(service, store)
        await asyncio.sleep(0.2)  # the first one ended meanwhile
        assert service.state.running == {first.job_id}  # not started again after the rollback
        assert service.attempts == {}  # the second did not start
        assert service.state.finished == {}  # the first one's outcome waits for the store
        store.broken = False
        async with asyncio.timeout(2):
            await service.store_health.back.wait()
        for _ in range(100):
            if len(service.state.finished) == 2:
                break
            await asyncio.sleep(0.01)
        assert set(service.state.finished) == {first.job_id, second.job_id}
    finally:
        executor.cancel()
        await asyncio.gather(executor, return_exceptions=True)


async def test_while_the_store_fails_a_warning_says_so_now_and_then(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(store_health, "REMIND_SECONDS", 3 * RETRY)
    store = FailingKV()
    service = make_service(store)
    with caplog.at_level("WARNING", logger="common.store_health"):
        fail_a_commit(service, store)
        await asyncio.sleep(12 * RETRY)
        said = [r.getMessage() for r in caplog.records if "store.still_failing" in r.getMessage()]
        assert 1 <= len(said) <= 4, said
        assert said[0].startswith("store.still_failing node for=") and "error=" in said[0]
        store.broken = False
        async with asyncio.timeout(2):
            await service.store_health.back.wait()
    caplog.clear()
    await asyncio.sleep(6 * RETRY)
    assert not [r for r in caplog.records if "still_failing" in r.getMessage()]

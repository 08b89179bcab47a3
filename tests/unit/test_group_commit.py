"""Group commit in `NodeService.persist_group`: the submissions of every client served in
one loop iteration share one commit, and a failed commit withdraws all their tickets."""

from __future__ import annotations

import asyncio

import pytest

from cluster_node.config import NodeConfig
from cluster_node.jobtypes import JobContext, load_job_types
from cluster_node.service import NodeService
from cluster_node.state import NodeState
from common.errors import StoreError
from common.jobs import JobId, NodeId
from common.kvstore import MemoryKV
from tests.stores import FailingKV


def make_service(store: MemoryKV) -> NodeService:
    state = NodeState(NodeId("n1"), "inc", slots=2)
    store.apply(state.initial_records())
    store.commit()
    ctx = JobContext(NodeId("n1"), False, 1.0, 1024, None)
    return NodeService(NodeConfig(), store, state, load_job_types(), ctx)


async def client(service: NodeService, jobs: int) -> list[JobId]:
    """What one client's batch does: stage submissions, then wait for the group commit."""
    ids = [service.submit("sleep", ("0",)) for _ in range(jobs)]
    await service.persist_group()
    return ids


async def test_clients_of_one_iteration_share_one_commit() -> None:
    store = MemoryKV()
    service = make_service(store)
    before = store.stats.commits
    batches = await asyncio.gather(*(client(service, 3) for _ in range(4)))
    assert store.stats.commits - before == 1
    committed = {k for k, _ in store.items()}
    assert all(f"t:{job_id}" in committed for ids in batches for job_id in ids)


async def test_a_failed_group_commit_fails_every_member() -> None:
    store = FailingKV()
    service = make_service(store)
    store.broken = True
    results = await asyncio.gather(*(client(service, 2) for _ in range(3)),
                                   return_exceptions=True)
    assert all(isinstance(r, StoreError) for r in results)
    assert not any(k.startswith("t:") for k, _ in store.items())


async def test_a_failure_between_staging_and_the_group_commit_is_reported() -> None:
    """Another commit (the proxy link's) fails and rolls the staged ticket back before the
    group commit runs: the group commit then has nothing to write, but must not report
    success for a job that is gone."""
    store = FailingKV()
    service = make_service(store)
    service.submit("sleep", ("0",))
    waiting = asyncio.ensure_future(service.persist_group())
    await asyncio.sleep(0)  # it joins the group (as the client's task does at once)
    store.broken = True
    with pytest.raises(StoreError):
        service.persist()  # the link's commit, in the same loop iteration
    store.broken = False
    with pytest.raises(StoreError):
        await waiting


async def test_a_member_that_goes_away_leaves_the_others_their_commit() -> None:
    """A client's task cancelled while it waits (its connection closed): the commit still
    runs and the other members of the group get their answer."""
    store = MemoryKV()
    service = make_service(store)
    leaving = asyncio.ensure_future(client(service, 1))
    staying = asyncio.ensure_future(client(service, 1))
    await asyncio.sleep(0)  # both joined the group
    leaving.cancel()
    ids = await staying
    assert leaving.cancelled()
    assert f"t:{ids[0]}" in {k for k, _ in store.items()}
    assert await client(service, 1)  # and the next group forms as usual

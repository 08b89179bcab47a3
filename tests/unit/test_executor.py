"""The executor runs each job in one task (`cluster_node.executor`): a stop request from the
proxy kills a running job and records it cancelled, however many times it is asked; a
shutdown stops it and records nothing, so that it runs again after the restart."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path

import pytest

from cluster_node.config import NodeConfig
from cluster_node.executor import executor_loop, run_job
from cluster_node.jobtypes import JobContext, load_job_types, runnable_types
from cluster_node.service import NodeService
from cluster_node.state import NodeState
from common.jobs import JobId, JobSpec, NodeId, Outcome, new_job_id
from common.kvstore import MemoryKV
from common.messages import Cancel, Job

NODE, ORIGIN = NodeId("n1"), NodeId("n2")


def make_service() -> NodeService:
    store = MemoryKV()
    state = NodeState(NODE, "inc", slots=2)
    store.apply(state.initial_records())
    store.commit()
    return NodeService(NodeConfig(), store, state, load_job_types(),
                       JobContext(NODE, False, 1.0, 1024, None))


def dispatch(service: NodeService, millis: int) -> JobId:
    spec = JobSpec(new_job_id(), "sleep", (str(millis),), ORIGIN, time.time())
    service.state.on_message(Job((spec,)), time.time())
    service.executor_wake.set()
    return spec.job_id


async def started(service: NodeService, job_id: JobId) -> None:
    """The executor picks a job, then its task begins: a few loop iterations."""
    for _ in range(20):
        if job_id in service.attempts:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{job_id} never started")


async def recorded(service: NodeService, job_id: JobId) -> Outcome:
    """Its outcome, once the executor records it (told by a finished hook)."""
    done = asyncio.Event()
    service.finished_hooks.append(lambda o: done.set() if o.job_id == job_id else None)
    if outcome_of(service, job_id) is None:
        async with asyncio.timeout(5):
            await done.wait()
    outcome = outcome_of(service, job_id)
    assert outcome is not None
    return outcome


def stop(service: NodeService, job_id: JobId) -> None:
    """A CANCEL frame from the proxy, as the link handles it."""
    service.state.on_message(Cancel((job_id,)), time.time())
    service.stop_killed_jobs()


def outcome_of(service: NodeService, job_id: JobId) -> Outcome | None:
    return service.state.finished.get(job_id)


async def test_a_stopped_job_is_recorded_cancelled_even_if_asked_twice() -> None:
    service = make_service()
    executor = asyncio.create_task(executor_loop(service))
    try:
        killed, other = dispatch(service, 60_000), dispatch(service, 0)
        await started(service, killed)
        await asyncio.sleep(0.2)
        stop(service, killed)
        stop(service, killed)  # a re-sent CANCEL: one kill, not a shutdown
        outcome = await recorded(service, killed)
        assert outcome.cancelled and not outcome.ok and "stopped" in outcome.output
        assert outcome.finished_at - outcome.started_at >= 0.2  # when it ran, not 0 s
        assert (await recorded(service, other)).ok
        assert service.attempts == {} and service.killed == set()
        assert not executor.done()  # the executor goes on
    finally:
        executor.cancel()
        await asyncio.gather(executor, return_exceptions=True)


async def test_a_job_stopped_before_its_task_began_never_runs() -> None:
    service = make_service()
    job_id = dispatch(service, 60_000)
    assert service.state.next_job() is not None  # picked, as the executor does, no task yet
    stop(service, job_id)
    assert job_id in service.kill_on_start
    service.state.running.discard(job_id)  # let the executor pick it again
    service.state._queue.appendleft(job_id)
    executor = asyncio.create_task(executor_loop(service))
    try:
        assert (await recorded(service, job_id)).cancelled
    finally:
        executor.cancel()
        await asyncio.gather(executor, return_exceptions=True)


async def test_a_shutdown_records_nothing_and_keeps_the_job() -> None:
    service = make_service()
    executor = asyncio.create_task(executor_loop(service))
    job_id = dispatch(service, 60_000)
    await started(service, job_id)
    executor.cancel()
    await asyncio.gather(executor, return_exceptions=True)
    assert outcome_of(service, job_id) is None
    assert job_id in service.state.held  # stored as held: it runs again after a restart
    assert service.attempts == {}


async def test_a_shutdown_on_top_of_a_kill_records_nothing() -> None:
    service = make_service()
    executor = asyncio.create_task(executor_loop(service))
    try:
        job_id = dispatch(service, 60_000)
        await started(service, job_id)
        task = service.attempts[job_id]
        stop(service, job_id)
        task.cancel()  # what a shutdown's TaskGroup does, before the task saw the kill
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled()
        assert outcome_of(service, job_id) is None and job_id in service.state.held
    finally:
        executor.cancel()
        await asyncio.gather(executor, return_exceptions=True)


def test_a_node_runs_every_type_it_has_but_sh_without_allow_shell(tmp_path: Path) -> None:
    types = load_job_types()
    ctx = JobContext(NODE, False, 1.0, 1024, None, work_root=tmp_path / "sh")
    assert "sh" not in runnable_types(types, ctx) and "fib" in runnable_types(types, ctx)
    assert "sh" in runnable_types(types, dataclasses.replace(ctx, allow_shell=True))


def test_a_node_whose_sh_directory_cannot_be_written_takes_no_sh_job(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """It failed every sh job it was given, saying nothing in its log."""
    blocker = tmp_path / "sh"
    blocker.write_text("a file where the directory should be")
    ctx = JobContext(NODE, True, 1.0, 1024, None, work_root=blocker)
    with caplog.at_level(logging.ERROR):
        assert "sh" not in runnable_types(load_job_types(), ctx)
    assert "sh.unavailable node=" in caplog.text and "this node takes no sh job" in caplog.text


def test_the_running_node_checks_a_jobs_arguments_too() -> None:
    """A JOB frame's arguments are whatever its sender wrote: `fib 30000000` kept two pool
    workers busy for a minute beside honest jobs, `sleep -1000` ran."""
    service = make_service()

    async def attempt(job_type: str, *args: str) -> Outcome:
        spec = JobSpec(new_job_id(), job_type, args, ORIGIN, time.time())
        return await run_job(service, spec)

    for job_type, args, why in (("fib", ("30000000",), "from 0 to 100000"),
                                ("sleep", ("-1000",), "sleep"), ("sleep", ("5", "6"), "sleep"),
                                ("fib", ("-5",), "fib")):
        outcome = asyncio.run(attempt(job_type, *args))
        assert not outcome.ok and outcome.output.startswith("InvalidJob: "), outcome
        assert why in outcome.output
    assert asyncio.run(attempt("fib", "0020")).output == "6765"  # as the origin reads it

"""Runs the jobs the proxy gave this node, at most SLOTS at a time, and records each
outcome (committed before the result leaves the node). A job the proxy gave an
`overdue_after` has a timer: still running when it fires, the job is reported at once."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from cluster_node.jobtypes import JobContext, JobFailed
from cluster_node.live_output import LiveOutput
from cluster_node.service import NodeService
from common.jobs import JobSpec, Outcome

logger = logging.getLogger(__name__)


def attempt_timeout(service: NodeService, spec: JobSpec) -> float:
    """Seconds one attempt may run: the job's own, else its type's default (0: no limit)."""
    if spec.timeout:
        return spec.timeout
    if spec.job_type == "sh":
        return service.ctx.sh_timeout
    job_type = service.job_types.get(spec.job_type)
    return job_type.default_timeout if job_type is not None else 0.0


async def run_job(service: NodeService, spec: JobSpec, ctx: JobContext | None = None,
                  started: float | None = None) -> Outcome:
    """One attempt (begun at `started`: now if not given). Any exception a job raises
    becomes a failed outcome, never a crash; an attempt past its timeout is cancelled (an
    `sh` job's process group is killed)."""
    started = time.time() if started is None else started
    overdue_after = service.state.overdue_after.get(spec.job_id)
    if overdue_after:  # from when its run time starts, as the proxy learned it
        service.arm_overdue(spec.job_id, overdue_after)  # disarmed by _run_and_record
    job_type = service.job_types.get(spec.job_type)
    limit = attempt_timeout(service, spec)
    ctx = ctx or service.ctx
    try:
        if job_type is None:
            raise LookupError(f"job type {spec.job_type!r} is not installed on this node")
        # Checked here too, not only by the origin: a JOB frame's arguments are whatever its
        # sender wrote (a `fib 30000000` from a peer kept two pool workers busy for a minute,
        # and honest fib jobs on that node timed out meanwhile; `sleep -1000` ran).
        args = job_type.validate(spec.args, ctx)
        if limit:
            async with asyncio.timeout(limit):
                output = await job_type.run(args, ctx)
        else:  # no limit (most jobs): no timeout context, ~3 us a job
            output = await job_type.run(args, ctx)
        ok = True
    except asyncio.CancelledError:
        raise
    except TimeoutError as exc:
        output, ok = str(exc) or f"timed out after {limit:g} s", False
    except JobFailed as exc:
        output, ok = str(exc), False
    except Exception as exc:
        output, ok = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, False
    return Outcome(spec.job_id, ok, output, service.state.node_id, started, time.time())


async def executor_loop(service: NodeService) -> None:
    async with asyncio.TaskGroup() as tasks:
        while True:
            await service.executor_wake.wait()
            service.executor_wake.clear()
            await service.store_health.back.wait()  # no job starts while the store fails
            state = service.state  # may be replaced after a storage failure
            while len(state.running) < state.slots:
                spec = state.next_job()
                if spec is None:
                    break
                logger.debug("job.started job_id=%s type=%s", spec.job_id, spec.job_type)
                tasks.create_task(_run_and_record(service, spec))


async def _run_and_record(service: NodeService, spec: JobSpec) -> None:
    """Run one attempt in this task and record its outcome. A kill from the proxy
    (`NodeService.stop_killed_jobs`) cancels this task once and is recorded as a cancelled
    outcome, unless the proxy abandoned the job (NodeState.abandon: nothing recorded); a
    shutdown cancels it too and records nothing (the job runs again after the restart).
    One task per job: a task for the attempt and one waiting on it cost ~10 us more per
    job."""
    ctx, live = _live_context(service, spec)
    task = asyncio.current_task()
    assert task is not None
    service.attempts[spec.job_id] = task
    started = time.time()
    service.state.began(spec.job_id, started)
    try:
        if spec.job_id in service.kill_on_start:  # stopped before it began
            service.kill_on_start.discard(spec.job_id)
            outcome = _stopped(service, spec, started)
        else:
            outcome = await run_job(service, spec, ctx, started)  # the start INFO said
    except asyncio.CancelledError:
        # One cancel is the kill's (NodeService.killed); any other is a shutdown's.
        if task.cancelling() > (spec.job_id in service.killed):
            raise
        if task.cancelling():
            task.uncancel()
        outcome = _stopped(service, spec, started)
    finally:
        service.disarm_overdue(spec.job_id)
        service.attempts.pop(spec.job_id, None)
        service.killed.discard(spec.job_id)
    if not service.store_health.healthy:
        # Recorded once the store is back (a shutdown meanwhile: it runs again after the
        # restart); a rollback meanwhile keeps it running (NodeService.roll_back).
        service.running_on.add(spec.job_id)
        try:
            await service.store_health.back.wait()
        finally:
            service.running_on.discard(spec.job_id)
    if outcome.cancelled and spec.job_id in service.state.abandoning:
        service.live.pop(spec.job_id, None)
        service.state.abandon(spec.job_id)  # no outcome: another run gives the result
        logger.info("job.abandoned job_id=%s reason=this node was declared dead while it "
                    "ran the job; another node has it now, or its result is in", spec.job_id)
        service.persist_later()  # its q: record's deletion: nothing waits on that
        return
    if live is not None:
        live.finish()
        service.flush_live(spec.job_id, everything=True)  # the last lines before the result
        service.live.pop(spec.job_id, None)
    service.state.finish(outcome)
    for hook in service.finished_hooks:
        hook(outcome)
    logger.debug("job.finished job_id=%s ok=%s", spec.job_id, outcome.ok)
    service.persist_soon()


def _stopped(service: NodeService, spec: JobSpec, started: float) -> Outcome:
    """A killed run: from when it started (`status` shows how long it ran), not a run of
    no time at the moment of the kill."""
    node = service.state.node_id
    return Outcome(spec.job_id, False, f"cancelled while running on {node}, stopped", node,
                   started, time.time(), cancelled=True)


def _live_context(service: NodeService, spec: JobSpec) -> tuple[JobContext, LiveOutput | None]:
    """The context a job runs with: with an `output_sink` feeding its live output if its
    type streams any (`sh`), else the node's own (most jobs: no per-job objects)."""
    job_type = service.job_types.get(spec.job_type)
    if job_type is None or not job_type.live_output:
        return service.ctx, None
    live = service.live[spec.job_id] = LiveOutput(service.ctx.sh_output_limit)
    sink = live.feed
    if spec.origin == service.state.node_id:  # a local `tail`: no need to wait for INFO

        def sink(chunk: bytes) -> None:
            live.feed(chunk)
            service.flush_live(spec.job_id)

    return replace(service.ctx, output_sink=sink), live

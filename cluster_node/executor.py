"""Runs the jobs the proxy gave this node, at most SLOTS at a time, and records each
outcome (committed before the result leaves the node)."""

from __future__ import annotations

import asyncio
import logging
import time

from cluster_node.service import NodeService
from common.jobs import JobSpec, Outcome

logger = logging.getLogger(__name__)


async def run_job(service: NodeService, spec: JobSpec) -> Outcome:
    """One attempt. Any exception a job raises becomes a failed outcome, never a crash."""
    started = time.time()
    job_type = service.job_types.get(spec.job_type)
    try:
        if job_type is None:
            raise LookupError(f"job type {spec.job_type!r} is not installed on this node")
        output, ok = await job_type.run(spec.args, service.ctx), True
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        output, ok = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, False
    return Outcome(spec.job_id, ok, output, service.state.node_id, started, time.time())


async def executor_loop(service: NodeService) -> None:
    async with asyncio.TaskGroup() as tasks:
        while True:
            await service.executor_wake.wait()
            service.executor_wake.clear()
            state = service.state  # may be replaced after a storage failure
            while len(state.running) < state.slots:
                spec = state.next_job()
                if spec is None:
                    break
                logger.debug("job.started job_id=%s type=%s", spec.job_id, spec.job_type)
                tasks.create_task(_run_and_record(service, spec))


async def _run_and_record(service: NodeService, spec: JobSpec) -> None:
    outcome = await run_job(service, spec)
    service.state.finish(outcome)
    for hook in service.finished_hooks:
        hook(outcome)
    logger.debug("job.finished job_id=%s ok=%s", spec.job_id, outcome.ok)
    service.persist_soon()

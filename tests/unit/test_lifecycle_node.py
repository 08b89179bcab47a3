"""The lifecycle rules of `NodeState` (issue 6): cancel at the origin, stopping jobs at the
runner, own failed jobs with retries going through the proxy, and `list`'s order."""

from __future__ import annotations

from typing import Any

from cluster_node.state import NodeState
from common.jobs import JobId, JobSpec, NodeId, Outcome
from common.messages import Ack, AckOf, Cancel, Job, Result
from common.packer import pack

ME, OTHER = NodeId("node-a"), NodeId("node-b")
T0 = 1_700_000_000.0


def spec(name: str, origin: NodeId = ME, **opts: Any) -> JobSpec:
    return JobSpec(JobId(name), "sleep", ("1",), origin, T0, **opts)


def restored(state: NodeState, records: dict[str, Any]) -> NodeState:
    records.update(state.take_changes())
    again = NodeState.restore([(k, v if isinstance(v, bytes) else pack(v))  # done: encoded
                               for k, v in records.items() if v is not None], 2)
    assert again is not None
    return again


def test_cancel_of_a_ticket_that_never_left_ends_it_here() -> None:
    state = NodeState(ME, "inc", 2)
    records = state.initial_records()
    state.submit(spec("a"))
    assert state.cancel(JobId("a"), T0 + 1) == "local"
    assert state.take_submissions(10) == []  # never forwarded now
    again = restored(state, records)
    outcome = again.tickets[JobId("a")].outcome
    assert outcome is not None and outcome.cancelled and outcome.state == "cancelled"
    assert again.cancel(JobId("a"), T0 + 2) == "finished"


def test_cancel_of_a_forwarded_ticket_is_sent_until_its_outcome_arrives() -> None:
    state = NodeState(ME, "inc", 2)
    records = state.initial_records()
    state.submit(spec("a"))
    state.take_submissions(10)
    state.on_message(Ack(AckOf.JOB, (JobId("a"),)))
    assert state.cancel(JobId("a"), T0) == "sent"
    assert state.take_cancels() == Cancel((JobId("a"),))
    assert state.take_cancels() is None  # once per connection
    state = restored(state, records)  # a restart: the cancel is still owed
    state.on_connect()
    assert state.take_cancels() == Cancel((JobId("a"),))
    done = Outcome(JobId("a"), False, "cancelled while queued, it never ran", NodeId("proxy"),
                   T0, T0, cancelled=True)
    state.on_message(Result((done,)))
    assert state.cancelling == {}
    state.on_connect()
    assert state.take_cancels() is None


def test_a_restarted_node_still_knows_which_tickets_the_proxy_holds() -> None:
    """The proxy's ACK of a submission is stored with the ticket: without it, a cancel just
    after a restart would be ended here as "never ran" while the proxy runs the job."""
    state = NodeState(ME, "inc", 2)
    records = state.initial_records()
    state.submit(spec("a"))
    state.take_submissions(10)
    state.on_message(Ack(AckOf.JOB, (JobId("a"),)))
    again = restored(state, records)
    assert again.take_submissions(10) == []  # not submitted again
    assert again.cancel(JobId("a"), T0 + 1) == "sent"


def test_stop_request_ends_an_unstarted_job_and_asks_to_kill_a_running_one() -> None:
    state = NodeState(ME, "inc", 1)
    state.on_message(Job((spec("x", OTHER), spec("y", OTHER))))
    running = state.next_job()
    assert running is not None and running.job_id == "x"
    state.on_message(Cancel((JobId("x"), JobId("y"))), T0)
    assert state.kill_requests == [JobId("x")]
    assert JobId("y") not in state.held
    finished = state.finished[JobId("y")]
    assert finished.cancelled and finished.output == "cancelled before it started on node-a"


def test_own_failed_job_with_retries_waits_for_the_proxys_verdict() -> None:
    state = NodeState(ME, "inc", 1)
    state.submit(spec("r", retries=2))
    state.submit(spec("p"))
    state.on_message(Job((spec("r", retries=2), spec("p"))))
    for name in ("r", "p"):
        state.next_job()
        state.finish(Outcome(JobId(name), False, "exit 1: no", ME, T0, T0))
    assert state.tickets[JobId("r")].outcome is None  # the proxy may retry it
    assert state.tickets[JobId("p")].outcome is not None  # no retries: final at once


def test_newest_tickets_filters_by_state_newest_first() -> None:
    state = NodeState(ME, "inc", 1)
    for name in ("a", "b", "c", "d"):
        state.submit(spec(name))
    state.cancel(JobId("b"), T0)
    assert [j for j, _ in state.newest_tickets("all", 10)] == ["d", "c", "b", "a"]
    assert [j for j, _ in state.newest_tickets("pending", 2)] == ["d", "c"]
    assert [j for j, _ in state.newest_tickets("cancelled", 10)] == ["b"]
    assert state.newest_tickets("done", 10) == []

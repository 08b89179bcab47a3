"""Issue 9 in the pure cores: the handshake proofs, the client guard, the sh policy, result
provenance and violation counting in ProxyState, what a node sends, and the store's format."""

from __future__ import annotations

import base64
import os
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster_node.client_guard import ClientGuard
from cluster_node.shell_policy import allowed_argv, clean_env, parse_prefixes
from cluster_node.state import NodeState
from common import auth
from common.errors import InvalidJob, StoreError
from common.jobs import JobId, JobSpec, NodeId, Outcome, new_job_id, ticket_of
from common.kvstore import SqliteKV
from common.messages import (
    PROTOCOL_VERSION,
    Ack,
    AckOf,
    Hello,
    Info,
    Job,
    Leaving,
    Result,
    Stats,
    Welcome,
)
from reverse_proxy.records import DISPATCHED, DONE, Outgoing, ProxySettings
from reverse_proxy.state import ProxyState

TOKEN = b"0123456789abcdef-token"
A, B, EVIL = NodeId("a"), NodeId("b"), NodeId("evil")

# ---------------------------------------------------------------------------- handshake


def test_token_from_value_or_file(tmp_path: Path) -> None:
    assert auth.load_token(None, None) is None
    assert auth.load_token("", None) is None
    assert auth.load_token(" " + TOKEN.decode() + "\n", None) == TOKEN
    path = tmp_path / "token"
    path.write_bytes(TOKEN + b"\n")
    assert auth.load_token(None, path) == TOKEN
    for value, file, message in [
        ("short", None, "at least 16 bytes"),
        (TOKEN.decode(), path, "not both"),
        (None, tmp_path / "missing", "cannot read CLUSTER_TOKEN_FILE"),
    ]:
        with pytest.raises(auth.TokenError, match=message):
            auth.load_token(value, file)


def test_a_proof_is_bound_to_the_token_both_nonces_and_the_identity() -> None:
    proof = auth.node_proof(TOKEN, "c1", "n1", "node", "inc")
    assert auth.check_node(TOKEN, "c1", "n1", "node", "inc", proof) is None
    assert TOKEN.decode() not in proof
    for args in [(b"another-token-0123456", "c1", "n1", "node", "inc"),
                 (TOKEN, "c2", "n1", "node", "inc"),  # another connection's challenge
                 (TOKEN, "c1", "n2", "node", "inc"),
                 (TOKEN, "c1", "n1", "other", "inc"),
                 (TOKEN, "c1", "n1", "node", "inc2")]:
        assert "wrong proof" in (auth.check_node(*args, proof) or "")
    assert "no proof" in (auth.check_node(TOKEN, "c1", "n1", "node", "inc", "") or "")
    # the proxy's proof is another function of the same inputs: neither stands for the other
    reflected = auth.proxy_proof(TOKEN, "c1", "n1", "node", "inc")
    assert reflected != proof
    assert auth.check_proxy(TOKEN, "c1", "n1", "node", "inc", proof) is not None
    assert auth.check_proxy(TOKEN, "c1", "n1", "node", "inc", reflected) is None
    assert auth.check_proxy(TOKEN, "c1", "n1", "node", "inc", "") is not None


def test_nonces_are_fresh() -> None:
    nonces = {auth.new_nonce() for _ in range(1000)}
    assert len(nonces) == 1000 and all(len(n) == 2 * auth.NONCE_BYTES for n in nonces)


@pytest.mark.parametrize(("host", "token", "insecure", "refused"), [
    ("127.0.0.1", None, False, False), ("localhost", None, False, False),
    ("::1", None, False, False), ("0.0.0.0", None, False, True), ("::", None, False, True),
    ("10.1.2.3", None, False, True), ("example.org", None, False, True),
    ("0.0.0.0", TOKEN, False, False), ("0.0.0.0", None, True, False),
])
def test_bind_refusal(host: str, token: bytes | None, insecure: bool, refused: bool) -> None:
    assert (auth.bind_refusal(host, token, insecure) is not None) == refused


def test_tickets_have_80_random_bits_after_a_time_prefix() -> None:
    tickets = [new_job_id() for _ in range(10_000)]
    assert {len(t) for t in tickets} == {24}  # base32: 24 x 5 = 120 bits
    # 8 characters (40 bits) of time, in submission order; then 16 characters of chance
    ticks = [int.from_bytes(base64.b32decode(t.upper())[:5], "big") for t in tickets]
    assert ticks == sorted(ticks)
    assert len({t[8:] for t in tickets}) == 10_000
    assert all(len({t[i] for t in tickets}) == 32 for i in range(8, 24))


def test_a_forked_child_does_not_repeat_its_parents_tickets() -> None:
    new_job_id()  # the pool of random characters is filled
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: say which ticket it would issue next, and leave at once
        os.write(write, new_job_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 100).decode()
    os.close(read)
    parent = new_job_id()
    assert len(child) == 24 and child[8:] != parent[8:]


@given(st.integers(0, 2**40 - 1), st.binary(min_size=10, max_size=10))
def test_a_ticket_is_the_base32_of_its_time_and_random_bytes(
        ticks: int, random: bytes) -> None:
    expected = base64.b32encode(ticks.to_bytes(5, "big") + random).decode().lower()
    assert ticket_of(ticks, random) == expected
    assert ticket_of(ticks + 2**40, random) == expected  # the time prefix wraps


# ---------------------------------------------------------------------------- clients


def test_client_guard_requires_auth_first() -> None:
    guard = ClientGuard("sesame-sesame", allow_list=True)
    assert guard.screen(b"") is None
    assert guard.screen(b"exit") is None  # leaving needs no token
    v = guard.screen(b"getall")
    assert v is not None and v.line == "ERR authenticate first: auth <token>"
    assert guard.screen(b"rabcdef") is not None
    v = guard.screen(b"auth sesame-sesame")
    assert v is not None and v.line == "OK authenticated"
    assert guard.screen(b"getall") is None and guard.screen(b"100") is None


def test_client_guard_closes_after_three_wrong_tokens() -> None:
    guard = ClientGuard("sesame-sesame", allow_list=True)
    verdicts = [guard.screen(b"AUTH nope") for _ in range(3)]
    assert [v.keep_open for v in verdicts if v is not None] == [True, True, False]
    assert not guard.authenticated


def test_allow_list_off_refuses_getall_and_list_only() -> None:
    guard = ClientGuard(None, allow_list=False)
    for line in (b"getall", b"GETALL", b"list", b"list done 10"):
        v = guard.screen(line)
        assert v is not None and "ALLOW_LIST=0" in v.line
    for line in (b"100", b"stats", b"listing", b"rabc"):
        assert guard.screen(line) is None
    v = guard.screen(b"auth x")
    assert v is not None and v.line.startswith("OK")


# ---------------------------------------------------------------------------- sh policy


def test_shell_allowlist_matches_whole_words() -> None:
    prefixes = parse_prefixes(" echo , ls -l,,git  status ")
    assert prefixes == ("echo", "ls -l", "git status")
    assert allowed_argv("echo hi; rm -rf /", prefixes) == ["echo", "hi;", "rm", "-rf", "/"]
    assert allowed_argv("ls -l /tmp", prefixes) == ["ls", "-l", "/tmp"]
    assert allowed_argv("git status --short", prefixes)[:2] == ["git", "status"]
    for refused in ("echoo hi", "ls /tmp", "ls -la", "git push", "sh -c 'echo'", "'unclosed"):
        with pytest.raises(InvalidJob):
            allowed_argv(refused, prefixes)


def test_sh_environment_is_clean() -> None:
    env = clean_env("/w")
    assert set(env) == {"PATH", "LANG", "HOME", "PWD", "DJS_JOB_DIR"}
    assert env["HOME"] == env["DJS_JOB_DIR"] == "/w"


# ---------------------------------------------------------------------------- provenance


def spec(n: int, origin: NodeId = A) -> JobSpec:
    return JobSpec(JobId(f"job{n}"), "fib", (str(n),), origin, 1.0)


def outcome(n: int, node: NodeId, text: str = "x") -> Outcome:
    return Outcome(JobId(f"job{n}"), True, text, node, 1.0, 2.0)


def hello(node: NodeId, slots: int = 1, finished: tuple[JobId, ...] = ()) -> Hello:
    return Hello(node, "i1", slots, PROTOCOL_VERSION, (), (), finished)


def closes(replies: list[Outgoing]) -> list[str]:
    """Why the proxy closes the node's connection, as its LEAVING says, if it does."""
    return [r.msg.reason for r in replies if isinstance(r.msg, Leaving)]


def proxy_with_job_on_b(max_violations: int = 3) -> ProxyState:
    proxy = ProxyState("p", ProxySettings(max_violations=max_violations))
    proxy.on_hello(hello(A, slots=0), 0.0)
    proxy.on_hello(hello(B), 0.0)
    proxy.on_hello(hello(EVIL, slots=0), 0.0)
    proxy.on_message(A, Job((spec(1),)), 0.0)
    assert proxy.jobs[JobId("job1")].node == B
    return proxy


def test_only_the_node_of_the_current_attempt_may_report_its_result() -> None:
    proxy = proxy_with_job_on_b()
    for forged in (outcome(1, EVIL), outcome(1, B)):  # as itself, or posing as B
        out = proxy.on_message(EVIL, Result((forged,)), 1.0)
        assert not [o for o in out if isinstance(o.msg, Ack)]
    assert proxy.jobs[JobId("job1")].state == DISPATCHED
    assert proxy.violations == 2 and proxy.nodes[EVIL].violations == 2
    logged = proxy.take_violations()
    assert [n for n, _ in logged] == [EVIL, EVIL]
    assert "never dispatched to it" in logged[0][1] and "as run by 'b'" in logged[1][1]
    out = proxy.on_message(B, Result((outcome(1, B),)), 1.0)
    assert Outgoing(B, Ack(AckOf.RESULT, (JobId("job1"),))) in out
    assert proxy.jobs[JobId("job1")].state == DONE
    # a result for a done job it never had is a violation too (not a "duplicate")
    proxy.on_message(EVIL, Result((outcome(1, EVIL, "y"),)), 1.1)
    assert proxy.duplicates == 0 and proxy.nodes[EVIL].violations == 3


def test_the_violation_limit_disconnects_and_a_new_connection_starts_afresh() -> None:
    proxy = proxy_with_job_on_b(max_violations=2)
    assert not closes(proxy.on_message(EVIL, Result((outcome(1, EVIL),)), 1.0))
    assert closes(proxy.on_message(EVIL, Result((outcome(1, EVIL),)), 1.0)) == [
        "2 protocol violations (the last: reported a result of job 'job1', which was never "
        "dispatched to it)"]
    proxy.on_disconnect(EVIL, 1.0)
    proxy.on_hello(hello(EVIL, slots=0), 1.1)
    assert proxy.nodes[EVIL].violations == 0


def test_a_node_submits_only_its_own_jobs_and_sends_only_node_messages() -> None:
    proxy = proxy_with_job_on_b()
    out = proxy.on_message(EVIL, Job((spec(2, origin=A), spec(3, origin=EVIL))), 1.0)
    assert Outgoing(EVIL, Ack(AckOf.JOB, (JobId("job3"),))) in out
    assert JobId("job2") not in proxy.jobs and JobId("job3") in proxy.jobs
    for msg in (Welcome("x"), Stats(0, ()), hello(EVIL)):
        proxy.on_message(EVIL, msg, 1.0)
    assert proxy.nodes[EVIL].violations == 4


def test_a_late_result_from_a_node_that_once_held_the_job_is_acked_not_recorded() -> None:
    proxy = proxy_with_job_on_b()
    proxy.on_disconnect(B, 0.5)
    proxy.on_hello(hello(NodeId("c")), 99.0)
    proxy.tick(100.0)  # B is dead: job1 goes to C
    assert proxy.jobs[JobId("job1")].node == NodeId("c")
    proxy.on_hello(hello(B, finished=(JobId("job1"),)), 100.1)
    out = proxy.on_message(B, Result((outcome(1, B),)), 100.2)
    assert out[0] == Outgoing(B, Ack(AckOf.RESULT, (JobId("job1"),)))
    assert proxy.jobs[JobId("job1")].state == DISPATCHED and proxy.violations == 0


def test_a_queued_job_a_node_says_it_finished_is_adopted_so_its_result_counts() -> None:
    proxy = ProxyState("p", ProxySettings())
    proxy.on_hello(hello(A, slots=0), 0.0)
    proxy.on_message(A, Job((spec(1),)), 0.0)  # queued: no slots anywhere
    proxy.on_hello(hello(B, slots=0, finished=(JobId("job1"),)), 0.1)
    assert proxy.jobs[JobId("job1")].node == B
    proxy.on_message(B, Result((outcome(1, B),)), 0.2)
    assert proxy.jobs[JobId("job1")].state == DONE and proxy.violations == 0


def test_an_info_flood_is_a_violation() -> None:
    settings = ProxySettings(info_rate=10.0, info_burst=20.0, max_violations=5)
    proxy = ProxyState("p", settings)
    proxy.on_hello(hello(A), 0.0)
    replies = [proxy.on_message(A, Info(0, 0, 1, 0, 0), 0.0) for _ in range(25)]
    assert sum(1 for r in replies if r and isinstance(r[0].msg, Stats)) == 20
    assert closes(replies[-1]) == ["5 protocol violations (the last: INFO flood)"]
    proxy.on_disconnect(A, 0.0)
    proxy.on_hello(hello(A), 1.0)
    for i in range(100):  # at the allowed rate, forever fine
        assert isinstance(proxy.on_message(A, Info(0, 0, 1, 0, 0), 1.0 + i / 10)[0].msg, Stats)


# ---------------------------------------------------------------------------- node side


def test_a_node_reports_only_jobs_it_ran_and_keeps_only_results_of_its_tickets() -> None:
    state = NodeState(NodeId("n"), "i", 1)
    state.on_message(Job((spec(1, origin=NodeId("o")),)))
    assert state.take_results(10) == []  # held, not run: nothing to report
    job = state.next_job()
    assert job is not None
    state.finish(outcome(1, NodeId("n")))
    assert [o.job_id for o in state.take_results(10)] == [JobId("job1")]
    state.on_message(Result((outcome(7, NodeId("x")),)))  # not a ticket of this node
    assert JobId("job7") not in state.tickets


# ---------------------------------------------------------------------------- storage


def test_the_store_never_unpickles(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    store = SqliteKV(tmp_path / "d", "node")
    store.close()

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str, str]]:
            return (open, (str(marker), "w"))

    import pickle

    db = sqlite3.connect(tmp_path / "d" / "node.sqlite")
    db.execute("INSERT INTO records (key, value) VALUES (?, ?)",
               ("t:x", pickle.dumps(Exploit())))
    db.commit()
    db.close()
    store = SqliteKV(tmp_path / "d", "node")
    try:
        with pytest.raises(StoreError):
            list(store.items())
    finally:
        store.close()
    assert not marker.exists()
    sources = [p.read_text() for pkg in ("common", "cluster_node", "reverse_proxy")
               for p in (Path(__file__).parents[2] / pkg).glob("*.py")]
    assert not [s for s in sources if "import pickle" in s or "pickle.load" in s]


def test_the_executing_node_checks_sh_permission_and_allowlist_too() -> None:
    import asyncio

    from cluster_node.jobtypes import JobContext, _run_sh

    off = JobContext(NodeId("n"), False, 5.0, 1000, None)
    with pytest.raises(InvalidJob, match="disabled"):
        asyncio.run(_run_sh(("echo hi",), off))
    listed = JobContext(NodeId("n"), True, 5.0, 1000, None, ("echo",))
    with pytest.raises(InvalidJob, match="not allowed"):
        asyncio.run(_run_sh(("cat /etc/passwd",), listed))
    assert asyncio.run(_run_sh(("echo hi | cat",), listed)) == "exit 0: hi | cat"

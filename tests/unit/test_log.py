"""Log lines: `event key=value`, and the same as fields in JSON lines."""

from __future__ import annotations

import json
import logging
import time

import pytest

from common.log import JsonFormatter, Throttled, parse_event


@pytest.mark.parametrize("message, expected", [
    ("node.joined node=n1 slots=4 peer=('127.0.0.1', 40894) holds=0",
     {"event": "node.joined", "node": "n1", "slots": "4", "peer": "('127.0.0.1', 40894)",
      "holds": "0"}),
    ("proxy.stopped", {"event": "proxy.stopped"}),
    ("proxy.link_lost error=Connection lost: reset by peer",
     {"event": "proxy.link_lost", "error": "Connection lost: reset by peer"}),
    ("store.failed level=x msg=y", {"event": "store.failed"}),  # cannot overwrite the record's
    ("Something Else happened", {}),
    ("odd.event free text then key=1", {"event": "odd.event"}),
    ("security.no_cluster_token: any process can join; set CLUSTER_TOKEN",
     {"event": "security.no_cluster_token"}),  # it had no event
])
def test_parse_event(message: str, expected: dict[str, str]) -> None:
    assert parse_event(message) == expected


def test_json_lines_carry_the_event_and_its_fields() -> None:
    record = logging.LogRecord("reverse_proxy.node_server", logging.INFO, __file__, 1,
                               "node.joined node=%s slots=%d", ("node-1", 4), None)
    line = json.loads(JsonFormatter().format(record))
    assert line["event"] == "node.joined" and line["node"] == "node-1" and line["slots"] == "4"
    assert line["level"] == "info" and line["msg"] == "node.joined node=node-1 slots=4"


def test_a_flood_of_one_warning_is_throttled_and_counted(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    throttled = Throttled(logging.getLogger("flood"), seconds=1.0, burst=3)
    with caplog.at_level(logging.WARNING, "flood"):
        for n in range(1000):
            throttled.warning("client.refused peer=%s reason=max_clients", n)
        throttled.warning("node.auth_failed peer=%s", "x")  # another kind: its own count
        clock[0] += 1.0
        throttled.warning("client.refused peer=%s reason=max_clients", "last")
    assert [r.getMessage() for r in caplog.records] == [
        "client.refused peer=0 reason=max_clients",
        "client.refused peer=1 reason=max_clients",
        "client.refused peer=2 reason=max_clients",
        "node.auth_failed peer=x",
        "client.refused peer=last reason=max_clients suppressed=997"]

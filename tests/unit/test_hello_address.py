"""HELLO's optional client address (additive: absent on the wire when empty)."""

from __future__ import annotations

import pytest

from common.errors import RemoteProtocolError
from common.jobs import NodeId
from common.messages import PROTOCOL_VERSION, Hello, from_wire, to_wire


def hello(address: str = "") -> Hello:
    return Hello(NodeId("n"), "inc", 4, PROTOCOL_VERSION, (), (), (), client_address=address)


def test_the_address_round_trips_and_is_absent_when_empty() -> None:
    assert from_wire(to_wire(hello("10.0.0.2:9000"))) == hello("10.0.0.2:9000")
    assert "client_address" not in to_wire(hello())
    assert from_wire(to_wire(hello())) == hello()


@pytest.mark.parametrize("bad", [7, None, "x" * 301])
def test_a_bad_address_is_a_protocol_error(bad: object) -> None:
    wire = {**to_wire(hello()), "client_address": bad}
    with pytest.raises(RemoteProtocolError):
        from_wire(wire)

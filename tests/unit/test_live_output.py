"""`LiveOutput`: bytes in, capped batches of lines out (the `tail` caps)."""

from __future__ import annotations

from cluster_node.live_output import (
    LIVE_LINE_CHARS,
    LIVE_LINES_PER_BATCH,
    LIVE_MAX_PENDING,
    LiveOutput,
)


def test_lines_split_across_chunks_come_out_whole() -> None:
    live = LiveOutput(10_000)
    for chunk in (b"he", b"llo\nwor", b"ld\r\n", b"\xc3", b"\xa9t\xc3\xa9"):
        live.feed(chunk)
    assert live.take() == ["hello", "world"]
    live.finish()
    assert live.take() == ["été"]
    assert live.take() == []


def test_long_lines_are_cut_and_batches_are_capped() -> None:
    live = LiveOutput(10**9)
    live.feed(b"x" * (LIVE_LINE_CHARS + 10) + b"\n")
    assert live.take() == ["x" * LIVE_LINE_CHARS + " [cut]"]
    live.feed(b"y\n" * (LIVE_LINES_PER_BATCH + 5))
    assert len(live.take()) == LIVE_LINES_PER_BATCH
    assert live.take() == ["y"] * 5


def test_a_flood_is_skipped_with_a_count_and_a_byte_cap_stops_it() -> None:
    live = LiveOutput(10**9)
    live.feed(b"z\n" * (LIVE_MAX_PENDING + 7))
    assert live.take()[0] == "[7 lines skipped]"
    capped = LiveOutput(10)
    capped.feed(b"0123456789abc\nmore\n")
    assert capped.take() == ["0123456789", "[live output stopped after 10 bytes; the result "
                             "has the output]"]
    capped.feed(b"later\n")
    assert capped.take() == []

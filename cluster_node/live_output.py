"""Live output of a running job, for `tail`: bytes in, capped batches of lines out. Pure.

Live output is a convenience, not a record (the result is what is durable), so it is capped
three ways and says where it cut: lines longer than LIVE_LINE_CHARS are cut, at most
LIVE_LINES_PER_BATCH lines leave per INFO_PERIOD (the rest are counted as skipped), and
after `max_bytes` (the node's SH_OUTPUT_LIMIT) a job streams nothing more.
"""

from __future__ import annotations

from cluster_node.output_text import output_text

# A terminal line; longer ones are cut (the full text is in the result, up to its limit).
LIVE_LINE_CHARS = 1024
# Lines sent per INFO_PERIOD (500 ms by default: at most 200 lines/s per job).
LIVE_LINES_PER_BATCH = 100
# Lines held between two batches; beyond this the oldest are dropped and counted.
LIVE_MAX_PENDING = 1000


class LiveOutput:
    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._seen = 0
        self._partial = bytearray()
        self._pending: list[str] = []
        self._skipped = 0
        self._stopped = False

    def feed(self, chunk: bytes) -> None:
        if self._stopped:
            return
        self._seen += len(chunk)
        if self._seen > self._max_bytes:
            chunk = chunk[: max(0, len(chunk) - (self._seen - self._max_bytes))]
            self._stopped = True
        self._partial += chunk
        *lines, rest = self._partial.split(b"\n")
        self._partial = bytearray(rest)
        for line in lines:
            self._add(bytes(line))
        if len(self._partial) > LIVE_LINE_CHARS * 4:  # a line without end: show it cut
            self._add(bytes(self._partial))
            self._partial.clear()
        if self._stopped:
            self.finish()
            self._pending.append(f"[live output stopped after {self._max_bytes} bytes; "
                                 "the result has the output]")

    def finish(self) -> None:
        if self._partial:
            self._add(bytes(self._partial))
            self._partial.clear()

    def _add(self, raw: bytes) -> None:
        self._pending.append(cut(output_text(raw.rstrip(b"\r"))))
        if len(self._pending) > LIVE_MAX_PENDING:
            del self._pending[0]
            self._skipped += 1

    def take(self) -> list[str]:
        """The next batch of lines (at most LIVE_LINES_PER_BATCH), with a note of skips."""
        out: list[str] = []
        if self._skipped:
            out.append(f"[{self._skipped} lines skipped]")
            self._skipped = 0
        room = LIVE_LINES_PER_BATCH - len(out)
        out += self._pending[:room]
        del self._pending[:room]
        return out


def cut(line: str) -> str:
    """A live line as a terminal shows it: at most LIVE_LINE_CHARS, then a mark."""
    return line if len(line) <= LIVE_LINE_CHARS else line[:LIVE_LINE_CHARS] + " [cut]"

"""Logging for the command-line entry points: one line per event, `event key=value`.

`LOG_FORMAT=json` gives one JSON object per line instead, with the event name and each
`key=value` of the message as fields of their own (`{"event": "node.joined", "node":
"node-1", ...}`), so the call sites keep one message format for both. Only CLIs call
`configure()`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

_RESERVED = frozenset(logging.makeLogRecord({}).__dict__)
# "event.name key=value key=value with spaces": a value runs until the next " key=".
# ("event.name: a sentence" is an event too, with the sentence in `msg`.)
_EVENT = re.compile(r"^([a-z][\w.]*):?(?: |$)")
_FIELD = re.compile(r"(?:^| )([a-z_][\w]*)=")
# Fields a message may not override (they describe the record itself).
_OWN = frozenset({"ts", "level", "logger", "msg", "event", "exc"})


def parse_event(message: str) -> dict[str, str]:
    """`event key=value ...` as a dict with "event" and the fields; {} if not that shape."""
    head = _EVENT.match(message)
    if head is None:
        return {}
    rest = message[head.end():]
    marks = list(_FIELD.finditer(rest))
    if rest and (not marks or marks[0].start() != 0):
        return {"event": head.group(1)}
    fields = {"event": head.group(1)}
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(rest)
        if mark.group(1) not in _OWN:
            fields[mark.group(1)] = rest[mark.end():end]
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        body.update(parse_event(str(body["msg"])))
        body.update({k: v for k, v in record.__dict__.items() if k not in _RESERVED})
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str)


def configure(level: str = "INFO", fmt: str = "text", name: str | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        prefix = f"{name} " if name else ""
        formatter = logging.Formatter(f"%(asctime)s.%(msecs)03dZ {prefix}%(levelname)s "
                                      "%(message)s", "%Y-%m-%dT%H:%M:%S")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # common.kvstore says in one StoreError line what sqlitedict logs as a stack of ERRORs.
    logging.getLogger("sqlitedict").setLevel(logging.CRITICAL)
    logging.getLogger("aiohttp.server").addFilter(_bad_http_request)


# A warning that anyone who reaches a port can cause (a refused connection, a failed
# handshake): at most THROTTLE_BURST of a kind per THROTTLE_SECONDS, the rest counted.
THROTTLE_SECONDS = 1.0
THROTTLE_BURST = 10


class Throttled:
    """Warnings of one kind (event), at most `burst` per `seconds`; those beyond are counted
    and said with the next one logged (`… suppressed=N`). A flood of refused connections
    wrote 78,490 lines, 8.5 MB, in 10 s."""

    def __init__(self, logger: logging.Logger, seconds: float = THROTTLE_SECONDS,
                 burst: int = THROTTLE_BURST) -> None:
        self.logger = logger
        self.seconds = seconds
        self.burst = burst
        self._window: dict[str, tuple[float, int]] = {}  # event -> (its start, logged)
        self._suppressed: dict[str, int] = {}

    def warning(self, msg: str, *args: object) -> None:
        """`msg` is `event key=value …`."""
        event = msg.split(" ", 1)[0]
        now = time.monotonic()
        start, logged = self._window.get(event, (now, 0))
        if now - start >= self.seconds:
            start, logged = now, 0
        if logged >= self.burst:
            self._suppressed[event] = self._suppressed.get(event, 0) + 1
            return
        self._window[event] = (start, logged + 1)
        suppressed = self._suppressed.pop(event, 0)
        if suppressed:
            msg, args = msg + " suppressed=%d", (*args, suppressed)
        self.logger.warning(msg, *args)



_http_log = Throttled(logging.getLogger("common.http"))


def _bad_http_request(record: logging.LogRecord) -> bool:
    """aiohttp logs a request it cannot parse (a line over 8 KB, garbage) as an ERROR with
    its traceback: anyone who reaches the dashboard or a node's /metrics, token or not,
    wrote 1.4 MB of log a second. One throttled line instead; the rest as it was."""
    from aiohttp.http_exceptions import HttpProcessingError

    error = record.exc_info[1] if record.exc_info else None
    if not isinstance(error, HttpProcessingError):
        return True
    _http_log.warning("http.bad_request error=%s", str(error.message)[:120])
    return False

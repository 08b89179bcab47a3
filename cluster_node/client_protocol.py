"""Sans-IO netcat line protocol: bytes in, commands out; replies rendered as text lines.

Compatible with the original to the letter for its four commands (a bare number,
`r<ticket>`, `getall`, `exit`); everything else is an addition. A line is UTF-8 text
ended by LF or CRLF. A line over the limit gets one error and the splitter resyncs at
the next newline, so the connection stays usable.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.jobs import JobId

# The longest legitimate line is `submit sh ` and a command of 8192 characters, each up to
# 4 bytes of UTF-8 (32,778 bytes); 40 KiB leaves room for options and caps abuse.
MAX_LINE_BYTES = 40 * 1024
# `wait` blocks the connection; an hour is the longest a person or script should ask for.
MAX_WAIT_SECONDS = 3600.0
DEFAULT_WAIT_SECONDS = 30.0

GOODBYE = "Come back later to check your results."
NOT_YET = "Result has not been executed yet, come back later."


@dataclass(frozen=True, slots=True)
class LineTooLong:
    limit: int


class LineSplitter:
    """Feeds bytes, returns complete lines (without the line ending) or `LineTooLong`."""

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_line_bytes
        self._discarding = False  # inside an over-long line, until its newline

    def feed(self, data: bytes) -> list[bytes | LineTooLong]:
        self._buffer += data
        out: list[bytes | LineTooLong] = []
        while True:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                # one byte more than the limit may be the CR of a CRLF still on its way
                if len(self._buffer) > self._max + 1:
                    if not self._discarding:
                        out.append(LineTooLong(self._max))
                        self._discarding = True
                    self._buffer.clear()
                return out
            line = bytes(self._buffer[:newline])
            del self._buffer[: newline + 1]
            if self._discarding:
                self._discarding = False
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            out.append(LineTooLong(self._max) if len(line) > self._max else line)

    def finish(self) -> list[bytes | LineTooLong]:
        """At end of input: an unterminated last line still counts."""
        rest, discarding = bytes(self._buffer), self._discarding
        self._buffer.clear()
        self._discarding = False
        if discarding or not rest:
            return []
        if rest.endswith(b"\r"):
            rest = rest[:-1]
        return [LineTooLong(self._max) if len(rest) > self._max else rest]


# ---------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class Submit:
    job_type: str
    args: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class GetResult:
    ticket: JobId
    legacy: bool  # `r<ticket>` (the original's form) rather than `result <ticket>`


@dataclass(frozen=True, slots=True)
class Status:
    ticket: JobId


@dataclass(frozen=True, slots=True)
class Wait:
    ticket: JobId
    seconds: float


@dataclass(frozen=True, slots=True)
class GetAll:
    pass


@dataclass(frozen=True, slots=True)
class ShowStats:
    pass


@dataclass(frozen=True, slots=True)
class Help:
    pass


@dataclass(frozen=True, slots=True)
class Quit:
    pass


@dataclass(frozen=True, slots=True)
class Empty:
    pass


@dataclass(frozen=True, slots=True)
class Invalid:
    reason: str


Command = (
    Submit | GetResult | Status | Wait | GetAll | ShowStats | Help | Quit | Empty | Invalid
)

HELP_LINES = (
    "Commands (one per line):",
    "  <ms>                      sleep job of <ms> milliseconds -> Ticket ID: <ticket>",
    "  submit <type> <args...>   any job type: sleep <ms> | fib <n> | sh <command>",
    "  r<ticket>                 the result of a ticket issued by this node",
    "  result <ticket>           the same",
    "  status <ticket>           where the job is: queued, dispatched, running, done, failed",
    "  wait <ticket> [seconds]   block until the result is there (default 30 s)",
    "  getall                    every ticket of this node, then a line 'END <count>'",
    "  stats                     this node and the cluster, on one line",
    "  help                      this text",
    "  exit                      close the connection",
    "END help",
)

_KEYWORDS = frozenset({"submit", "result", "status", "wait", "getall", "stats", "help",
                       "exit", "quit"})


def _ticket_arg(words: list[str], name: str) -> JobId | Invalid:
    if len(words) != 2:
        return Invalid(f"{name} takes one ticket, e.g. '{name} <ticket>'")
    return JobId(words[1])


def _wait(words: list[str]) -> Command:
    if len(words) not in (2, 3):
        return Invalid("usage: wait <ticket> [seconds]")
    seconds = DEFAULT_WAIT_SECONDS
    if len(words) == 3:
        try:
            seconds = float(words[2])
        except ValueError:
            return Invalid(f"wait: seconds must be a number, got {words[2][:40]!r}")
        if not 0 <= seconds <= MAX_WAIT_SECONDS:
            return Invalid(f"wait: seconds must be from 0 to {MAX_WAIT_SECONDS:g}")
    return Wait(JobId(words[1]), seconds)


def _simple(keyword: str, words: list[str]) -> Command:
    if len(words) != 1:
        return Invalid(f"{keyword} takes no arguments")
    simple: dict[str, Command] = {"getall": GetAll(), "stats": ShowStats(), "help": Help(),
                                  "exit": Quit(), "quit": Quit()}
    return simple[keyword]


def _submission(text: str, words: list[str]) -> Submit:
    job_type = words[0].lower()
    if job_type == "sh":  # keep the command's own spacing
        command = text[len(words[0]):].strip()
        return Submit("sh", (command,) if command else ())
    return Submit(job_type, tuple(words[1:]))


def parse_command(raw: bytes, job_types: frozenset[str] = frozenset()) -> Command:  # noqa: C901
    """One line to one command. `<type> <args...>` for a known job type is a submission too
    (`fib 90`, `sleep 100`, `sh echo hi`)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return Invalid("line is not UTF-8 text; type 'help' for the commands")
    if "\x00" in line:
        return Invalid("line contains a NUL byte; type 'help' for the commands")
    words = line.split()
    if not words:
        return Empty()
    head = words[0]
    keyword = head.lower()
    if len(words) == 1 and head.isascii() and head.isdigit():
        return Submit("sleep", (head,))
    if keyword == "submit":
        if len(words) < 2:
            return Invalid("usage: submit <type> <args...>, e.g. 'submit fib 90'")
        return _submission(line.strip()[len(head):].strip(), words[1:])
    if keyword in job_types and keyword not in _KEYWORDS:
        return _submission(line.strip(), words)
    if keyword in ("result", "status"):
        ticket = _ticket_arg(words, keyword)
        if isinstance(ticket, Invalid):
            return ticket
        return GetResult(ticket, legacy=False) if keyword == "result" else Status(ticket)
    if keyword == "wait":
        return _wait(words)
    if keyword in _KEYWORDS:
        return _simple(keyword, words)
    if head.startswith("r") and len(words) == 1 and len(head) > 1:
        return GetResult(JobId(head[1:]), legacy=True)
    shown = line.strip()[:60]
    return Invalid(f"unknown command {shown!r}; send a number of ms, r<ticket>, getall, "
                   "exit, or 'help' for the rest")


# ---------------------------------------------------------------------------- replies


def render_ticket(ticket: JobId) -> str:
    return f"Ticket ID: {ticket}"


def render_result(output: str, ok: bool) -> str:
    return f"Result: {output}" if ok else f"Result: FAILED: {output}"


def render_error(reason: str) -> str:
    return f"ERR {reason}"


def render_unknown(ticket: str) -> str:
    return render_error(f"unknown ticket {ticket[:64]!r}: this node never issued it "
                        "(ask the node you submitted it to)")

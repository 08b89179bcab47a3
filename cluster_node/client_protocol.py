"""Sans-IO netcat line protocol: bytes in, commands out; replies rendered as text lines.

Compatible with the original to the letter for its four commands (a bare number,
`r<ticket>`, `getall`, `exit`); everything else is an addition. A line is UTF-8 text
ended by LF or CRLF. A line over the limit gets one error and the splitter resyncs at
the next newline, so the connection stays usable.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster_node.output_text import one_line
from common.jobs import JobId, ticket_time

# The longest legitimate line is `submit sh ` and a command of 8192 characters, each up to
# 4 bytes of UTF-8 (32,778 bytes); 40 KiB leaves room for options and caps abuse.
MAX_LINE_BYTES = 40 * 1024
# `wait` blocks the connection; an hour is the longest a person or script should ask for.
MAX_WAIT_SECONDS = 3600.0
DEFAULT_WAIT_SECONDS = 30.0
# Submission options: bounds that catch typos (a priority is an ordering, not a quantity;
# a delay past 30 days or a timeout past 7 days is almost surely a mistake).
MAX_PRIORITY = 1_000_000
MAX_DELAY_SECONDS = 30 * 86_400.0
MAX_TIMEOUT_SECONDS = 7 * 86_400.0
MAX_RETRIES = 100
# `list` answers at most this many tickets, newest first.
DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 10_000
LIST_STATES = ("all", "pending", "done", "failed", "cancelled")

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


@dataclass(slots=True)  # not frozen: built per submitted line, 0.65 -> 0.16 us
class Submit:
    job_type: str
    args: tuple[str, ...]
    priority: int = 0
    delay: float = 0.0
    timeout: float = 0.0  # 0: the job type's default
    retries: int | None = None  # None: the node's JOB_RETRIES


@dataclass(frozen=True, slots=True)
class Cancel:
    ticket: JobId


@dataclass(frozen=True, slots=True)
class Tail:
    ticket: JobId


@dataclass(frozen=True, slots=True)
class List:
    state: str
    limit: int


@dataclass(frozen=True, slots=True)
class SetMode:
    json: bool


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
    | Cancel | List | SetMode | Tail
)

HELP_LINES = (
    "Commands (one per line):",
    "  <ms>                      sleep job of <ms> milliseconds -> Ticket ID: <ticket>",
    "  submit <type> <args...>   any job type: sleep <ms> | fib <n> | sh <command>",
    "  submit [--priority N] [--delay S] [--timeout S] [--retries N] <type> <args...>",
    "                            higher priority first; not before S seconds; killed after",
    "                            S seconds; failed attempts retried N times with backoff",
    "  cancel <ticket>           stop a job: removed if queued, killed if running",
    "  tail <ticket>             an sh job's output lines as they come, then its result",
    "  list [state] [limit]      this node's tickets, newest first (state: all, pending,",
    "                            done, failed, cancelled; limit default 100)",
    "  json / text               answer in JSON objects (one per line) / in text",
    "  r<ticket>                 the result of a ticket issued by this node",
    "  result <ticket>           the same",
    "  status <ticket>           state (queued, dispatched, running, done, failed,",
    "                            cancelled), node, attempts and times",
    "  wait <ticket> [seconds]   block until the result is there (default 30 s)",
    "  getall                    every ticket of this node, then a line 'END <count>'",
    "  stats                     this node and the cluster, on one line",
    "  auth <token>              first, where the node asks for one (CLIENT_TOKEN)",
    "  help                      this text",
    "  exit                      close the connection",
    "END help",
)

_KEYWORDS = frozenset({"submit", "result", "status", "wait", "getall", "stats", "help",
                       "exit", "quit", "cancel", "list", "json", "text", "tail"})


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
                                  "exit": Quit(), "quit": Quit(), "json": SetMode(True),
                                  "text": SetMode(False)}
    return simple[keyword]


def _submission(line: str, words: list[str], job_type: str) -> Submit:
    """`<type> <args...>`; `job_type` is the first word in lower case."""
    if job_type == "sh":  # keep the command's own spacing
        command = line.strip()[len(words[0]):].strip()
        return Submit("sh", (command,) if command else ())
    return Submit(job_type, tuple(words[1:]))


_OPTIONS: dict[str, tuple[str, float, float]] = {  # option: (field, low, high)
    "--priority": ("priority", -MAX_PRIORITY, MAX_PRIORITY),
    "--delay": ("delay", 0, MAX_DELAY_SECONDS),
    "--timeout": ("timeout", 0.001, MAX_TIMEOUT_SECONDS),
    "--retries": ("retries", 0, MAX_RETRIES),
}


def _number(value: float) -> str:
    """1000000 as 1000000, not 1e+06; 0.001 as 0.001."""
    return str(int(value)) if value == int(value) else f"{value:g}"


def _option_value(name: str, text: str) -> float | int | Invalid:
    field, low, high = _OPTIONS[name]
    try:
        value: float | int = int(text) if field in ("priority", "retries") else float(text)
    except ValueError:
        kind = "a whole number" if field in ("priority", "retries") else "a number of seconds"
        return Invalid(f"{name} takes {kind}, got {text[:40]!r}")
    if not low <= value <= high:  # also refuses nan
        return Invalid(f"{name} must be from {_number(low)} to {_number(high)}, "
                       f"got {text[:40]!r}")
    return value


def _submit_with_options(text: str, words: list[str]) -> Submit | Invalid:
    """`submit [--priority N] [--delay S] [--timeout S] [--retries N] <type> <args...>`;
    `text` is the line after `submit`, `words` its words."""
    values: dict[str, float | int] = {}
    while words and words[0].startswith("--"):
        name, eq, inline = words[0].partition("=")
        if name not in _OPTIONS:
            return Invalid(f"unknown option {name[:40]!r}; options: {', '.join(_OPTIONS)}")
        taken = 1 if eq else 2
        if not eq and len(words) < 2:
            return Invalid(f"{name} needs a value")
        value = _option_value(name, inline if eq else words[1])
        if isinstance(value, Invalid):
            return value
        values[_OPTIONS[name][0]] = value
        for word in words[:taken]:
            text = text[text.index(word) + len(word):]
        words = words[taken:]
    if not words:
        return Invalid("usage: submit [options] <type> <args...>, e.g. 'submit fib 90'")
    sub = _submission(text, words, words[0].lower())
    retries = values.get("retries")
    return Submit(sub.job_type, sub.args, priority=int(values.get("priority", 0)),
                  delay=float(values.get("delay", 0.0)), timeout=float(values.get("timeout", 0.0)),
                  retries=None if retries is None else int(retries))


def _list(words: list[str]) -> List | Invalid:
    state, limit = "all", DEFAULT_LIST_LIMIT
    given: set[str] = set()  # each at most once: `list 1 2` is a slip, not a limit of 2
    for word in words[1:]:
        if word.isascii() and word.isdigit() and len(word) <= 9 and "limit" not in given:
            limit = int(word)
            given.add("limit")
        elif word.lower() in LIST_STATES and "state" not in given:
            state = word.lower()
            given.add("state")
        else:
            return Invalid(f"usage: list [state] [limit]; state is one of {', '.join(LIST_STATES)}"
                           f", limit 1 to {MAX_LIST_LIMIT}")
    if not 1 <= limit <= MAX_LIST_LIMIT or len(words) > 3:
        return Invalid(f"usage: list [state] [limit]; limit from 1 to {MAX_LIST_LIMIT}")
    return List(state, limit)


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
        return _submit_with_options(line.strip()[len(head):], words[1:])
    if keyword in job_types and keyword not in _KEYWORDS:
        return _submission(line, words, keyword)
    if keyword in ("result", "status", "cancel", "tail"):
        ticket = _ticket_arg(words, keyword)
        if isinstance(ticket, Invalid):
            return ticket
        if keyword in ("cancel", "tail"):
            return Cancel(ticket) if keyword == "cancel" else Tail(ticket)
        return GetResult(ticket, legacy=False) if keyword == "result" else Status(ticket)
    if keyword == "list":
        return _list(words)
    if keyword == "wait":
        return _wait(words)
    if keyword in _KEYWORDS:
        return _simple(keyword, words)
    if keyword.startswith("r") and len(words) == 1 and len(head) > 1:  # R<ticket> too
        return GetResult(JobId(head[1:]), legacy=True)
    if keyword == "r" and len(words) == 2:  # `r <ticket>`: the space is an easy slip
        return GetResult(JobId(words[1]), legacy=True)
    shown = line.strip()[:60]
    return Invalid(f"unknown command {shown!r}; send a number of ms, r<ticket>, getall, "
                   "exit, or 'help' for the rest")


# ---------------------------------------------------------------------------- replies


def render_ticket(ticket: JobId) -> str:
    return f"Ticket ID: {ticket}"


def render_result(output: str, ok: bool, cancelled: bool = False) -> str:
    output = one_line(output)  # (a remote runner's text: see output_text.one_line)
    if cancelled:
        return f"Result: CANCELLED: {output}"
    return f"Result: {output}" if ok else f"Result: FAILED: {output}"


def render_error(reason: str) -> str:
    return f"ERR {reason}"


def render_unknown(ticket: str, now: float = 0.0, result_ttl: float = 0.0,
                   max_results: int = 0, oldest_kept: float | None = None,
                   created: float | None = None) -> str:
    """For a ticket issued longer than RESULT_TTL ago, or before the oldest ticket this node
    still keeps (its first characters tell when it was issued), say that its result may
    have expired here rather than that it was never issued; unless it dates from before
    this node's data directory was `created` (or from the future)."""
    issued = ticket_time(ticket)
    if issued is None or issued > now + CLOCK_SLACK:
        return _never_issued(ticket)
    if created is not None and issued < created - CLOCK_SLACK:
        return render_error(f"unknown ticket {ticket!r}: issued {span(now - issued)} ago, "
                            f"before this node's data directory began ({span(now - created)}"
                            " ago): this node never issued it (ask the node you submitted "
                            "it to)")
    if result_ttl > 0 and now - issued > result_ttl:
        kept = f"results {span(result_ttl)} after their job finished (RESULT_TTL)"
    elif max_results > 0 and oldest_kept is not None and issued < oldest_kept:
        kept = f"the newest {max_results} results (MAX_RESULTS)"
    else:
        return _never_issued(ticket)
    return render_error(f"unknown ticket {ticket!r}: issued {span(now - issued)} ago, and "
                        f"this node keeps {kept}: expired here, or issued by another node")


# Clocks of the nodes of one cluster may differ by this much.
CLOCK_SLACK = 60.0


def _never_issued(ticket: str) -> str:
    return render_error(f"unknown ticket {ticket[:64]!r}: this node never issued it "
                        "(ask the node you submitted it to)")


def span(seconds: float) -> str:
    """A duration as people say it: 45 s, 12 min, 5 h, 7 d."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"

"""Bulk submission for `djs submit --file`: turn a jobs file into protocol lines (pure), and
send them over one connection, pipelined, reading the answers in order.

Two formats:
- `.json`: a list of `{"job_type": "fib", "payload": 90}` objects (the seed systems' form);
  `payload` is a string, a number or a list of arguments; optional `priority`, `delay`,
  `timeout`, `retries` keys become the `submit` options of the same names.
- anything else: one protocol line per line, as typed into netcat (`1500`, `fib 90`,
  `submit --priority 3 sh echo hi`); blank lines and lines starting with `#` are skipped.
Every entry becomes one `submit ...` line, so every line gets exactly one answer.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common.errors import SchedulerError
from common.netcat import LineClient

# Lines sent per write: big enough to fill the pipe, small enough to show progress.
WRITE_CHUNK = 500
OPTION_KEYS = ("priority", "delay", "timeout", "retries")
# Words that start a command other than a submission (they would answer more or less
# than one line, and break the one-answer-per-line pairing).
NOT_SUBMISSIONS = frozenset({"result", "status", "wait", "getall", "stats", "help", "exit",
                             "quit", "cancel", "list", "json", "text"})


class BadJobsFile(SchedulerError):
    """The jobs file cannot be read as either format; says where and why."""


def _payload_words(payload: Any, where: str) -> list[str]:
    if isinstance(payload, bool) or payload is None:
        raise BadJobsFile(f"{where}: payload must be a string, a number or a list")
    if isinstance(payload, str | int | float):
        return [str(payload)]
    if isinstance(payload, list) and all(isinstance(p, str | int | float) for p in payload):
        return [str(p) for p in payload]
    raise BadJobsFile(f"{where}: payload must be a string, a number or a list")


def json_lines(text: str) -> list[str]:
    try:
        entries = json.loads(text)
    except ValueError as exc:
        raise BadJobsFile(f"not JSON: {exc}") from exc
    if not isinstance(entries, list):
        raise BadJobsFile("a JSON jobs file is a list of {\"job_type\", \"payload\"} objects")
    lines = []
    for i, entry in enumerate(entries):
        where = f"entry {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("job_type"), str):
            raise BadJobsFile(f"{where}: needs a \"job_type\" string")
        options = [f"--{k} {entry[k]}" for k in OPTION_KEYS if entry.get(k) is not None]
        words = _payload_words(entry.get("payload", []), where) if "payload" in entry else []
        lines.append(" ".join(["submit", *options, entry["job_type"], *words]))
    return lines


def text_lines(text: str) -> list[str]:
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        head = line.split()[0].lower()
        if head in NOT_SUBMISSIONS or (head.startswith("r") and len(line.split()) == 1
                                       and not head.isdigit() and len(head) > 20):
            raise BadJobsFile(f"line {number}: {line[:60]!r} is not a job")
        if line.isdigit():
            line = f"sleep {line}"
        lines.append(line if head == "submit" else f"submit {line}")
    return lines


def load_jobs(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return json_lines(text) if path.suffix.lower() == ".json" else text_lines(text)


def submit_all(client: LineClient, lines: Sequence[str],
               progress: Callable[[int], None]) -> list[str]:
    """Send every line (a writer thread) while reading the answers (this thread); the
    answers in order, one per line."""
    failure: list[BaseException] = []

    def write() -> None:
        try:
            for start in range(0, len(lines), WRITE_CHUNK):
                client.send_lines(lines[start:start + WRITE_CHUNK])
        except OSError as exc:
            failure.append(exc)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    answers = []
    try:
        for _ in lines:
            answers.append(client.read_line())
            progress(1)
    finally:
        writer.join(timeout=5)
    if failure and len(answers) < len(lines):
        raise failure[0]
    return answers

"""Parsing of `djs submit --file` jobs files (common/bulk.py)."""

from __future__ import annotations

import pytest

from common.bulk import BadJobsFile, json_lines, text_lines


def test_json_entries_become_submit_lines() -> None:
    text = ('[{"job_type": "fib", "payload": 90}, {"job_type": "sh", "payload": "echo hi"},'
            ' {"job_type": "sleep", "payload": ["10"], "priority": 3, "delay": 1.5},'
            ' {"job_type": "noargs"}]')
    assert json_lines(text) == ["submit fib 90", "submit sh echo hi",
                                "submit --priority 3 --delay 1.5 sleep 10", "submit noargs"]


@pytest.mark.parametrize(("text", "says"), [
    ("nope", "not JSON"),
    ('{"job_type": "fib"}', "is a list"),
    ('[{"payload": 1}]', 'entry 0: needs a "job_type"'),
    ('[{"job_type": "fib", "payload": null}]', "entry 0: payload must be"),
    ('[{"job_type": "fib", "payload": {"n": 1}}]', "entry 0: payload must be"),
])
def test_bad_json_files_say_where(text: str, says: str) -> None:
    with pytest.raises(BadJobsFile, match=says):
        json_lines(text)


def test_text_lines_are_protocol_lines() -> None:
    assert text_lines("# jobs\n1500\n\n  fib 90 \nsubmit --retries 2 sh exit 1\n") == [
        "submit sleep 1500", "submit fib 90", "submit --retries 2 sh exit 1"]


@pytest.mark.parametrize("line", ["getall", "status x", "exit", "json", "r" + "a" * 24])
def test_text_lines_that_are_not_jobs_are_refused(line: str) -> None:
    with pytest.raises(BadJobsFile, match="line 2"):
        text_lines(f"fib 1\n{line}\n")

"""The peers' side of the workloads: the RQ job function and the beanstalkd worker.

RQ workers import `peer_jobs.sleep0` (the benchmarks put this directory on PYTHONPATH);
`python benchmarks/peer_jobs.py beanstalk PORT` is one beanstalkd worker process.
"""

from __future__ import annotations

import contextlib
import sys
import time


def sleep0() -> str:
    """The RQ job: the same work as djs's `sleep 0`."""
    started = time.time()
    time.sleep(0)
    return f"slept 0 ms (started {started}, finished {time.time()})"


def beanstalk_worker(port: int) -> None:
    """Reserve `sleep <ms> <reply-tube>` jobs from tube `jobs`, run them, put the result in
    the reply tube, delete the job: at-least-once, as djs does."""
    import greenstalk

    client = greenstalk.Client(("127.0.0.1", port), watch="jobs", use="default")
    using = "default"
    while True:
        job = client.reserve()
        _, ms, reply_tube = str(job.body).split()
        started = time.time()
        time.sleep(int(ms) / 1000)
        if reply_tube != using:
            client.use(reply_tube)
            using = reply_tube
        client.put(f"slept {ms} ms (started {started}, finished {time.time()})")
        client.delete(job)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "beanstalk":
        raise SystemExit("usage: peer_jobs.py beanstalk PORT")
    with contextlib.suppress(KeyboardInterrupt):
        beanstalk_worker(int(sys.argv[2]))

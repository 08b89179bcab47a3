"""How long a job is expected to run, learned per job *signature* (its type and arguments:
`sleep 50`, `fib 30`, one `sh` command line) from the results of every node. Pure: no
clock, no I/O; the proxy feeds it each successful result's run time.

How it works. Each signature keeps its last few run times; the estimate is their median,
so one result from a node that slowed down (or one hiccup) does not move it, while a job
whose length really changed is followed within a few runs. Signatures live in an LRU of
bounded size, keyed by a digest (an `sh` line can be long). Too few runs: no estimate
(the caller falls back on the cluster's typical job time).
"""

from __future__ import annotations

import hashlib
import statistics
from collections import OrderedDict, deque

from common.jobs import JobSpec

# Signatures remembered; past this the least recently seen is dropped. Each costs ~200
# bytes, so the bound is under 1 MB, and a workload of a few thousand kinds of jobs fits.
MAX_SIGNATURES = 4096
# Run times kept per signature: the median of 5 shrugs off two outliers.
WINDOW = 5
# Runs needed before a signature has an estimate: one run could be a fluke.
MIN_RUNS = 2


def signature(spec: JobSpec) -> bytes:
    """What makes two jobs alike: the same type and arguments (not the origin or options)."""
    text = "\0".join((spec.job_type, *spec.args))
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class JobTimes:
    def __init__(self, max_signatures: int = MAX_SIGNATURES) -> None:
        self.max_signatures = max_signatures
        self._runs: OrderedDict[bytes, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._runs)

    def observe(self, spec: JobSpec, seconds: float) -> None:
        """One run of `spec` took `seconds` (a successful one: failures end at random)."""
        key = signature(spec)
        runs = self._runs.get(key)
        if runs is None:
            runs = self._runs[key] = deque(maxlen=WINDOW)
            if len(self._runs) > self.max_signatures:
                self._runs.popitem(last=False)
        else:
            self._runs.move_to_end(key)
        runs.append(max(0.0, seconds))

    def expected(self, spec: JobSpec) -> float | None:
        """The median of its recent runs, or None with fewer than MIN_RUNS of them."""
        runs = self._runs.get(signature(spec))
        if runs is None or len(runs) < MIN_RUNS:
            return None
        return statistics.median(runs)

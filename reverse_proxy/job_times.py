"""How long jobs run, as the proxy learns it from results: the cluster's typical job time
and how long its usual jobs run at the most (`TypicalTime`), each node's recent mean
(`node_mean`), and the time a job is expected to run, per job *signature* (its type and
arguments: `sleep 50`, `fib 30`, one `sh` command line), from the results of every node
(`JobTimes`). Pure: no clock, no I/O.

How it works. Each signature keeps its last few run times; the estimate is their median,
so one result from a node that slowed down (or one hiccup) does not move it, while a job
whose length really changed is followed within a few runs. Signatures live in an LRU of
bounded size, keyed by a digest (an `sh` line can be long). Too few runs: no estimate
(the caller falls back on the cluster's typical job time).

What was learned survives a restart of the proxy (`to_wire`, saved by the state now and
then): a restarted proxy that had to see 20 results again before it trusted the typical
time would not call a job overdue meanwhile, which with jobs of minutes is hours.
"""

from __future__ import annotations

import hashlib
import statistics
from collections import OrderedDict, deque
from typing import Any

from common.jobs import JobSpec

# Signatures remembered; past this the least recently seen is dropped. Each costs ~200
# bytes, so the bound is under 1 MB, and a workload of a few thousand kinds of jobs fits.
MAX_SIGNATURES = 4096
# Run times kept per signature: the median of 5 shrugs off two outliers.
WINDOW = 5
# Runs needed before a signature has an estimate: one run could be a fluke.
MIN_RUNS = 2
# Weight of the newest job time in a node's running mean: it rises fast, so one job 10x
# slower than typical marks a node slow, and falls slower, so a slow node's last fast jobs
# do not unmark it at once (about five typical jobs clear it) ...
JOB_TIME_RISE, JOB_TIME_FALL = 0.7, 0.3
# ... while the cluster's typical job time moves slowly, over its last ~50 jobs (over its
# first 50 it is their plain mean, so the first job alone does not set it for long).
TYPICAL_JOB_TIME_SMOOTHING = 0.02
# Results needed before the typical time is trusted (to call running jobs overdue, to size
# the prefetch): the mean of 20 jobs of 5-100 ms (uniform) has a standard error of 12 % of
# the long-run mean.
TRUSTED_AFTER_RESULTS = 20
# How long a job on a healthy node may run, for jobs nothing is known of: the time within
# which this share of the recent jobs ended. A mean says little of a mix of 5 ms and 800 ms
# jobs; the 95th percentile of the last 200 is ~the longest of the usual ones.
LONG_QUANTILE, RECENT_RESULTS = 0.95, 200


def smooth(mean: float | None, value: float, weight: float) -> float:
    """Exponentially weighted running mean; the first value starts it."""
    return value if mean is None else mean + weight * (value - mean)


def node_mean(mean: float | None, seconds: float) -> float:
    """A node's running mean job time after one more job of `seconds`."""
    rising = mean is not None and seconds > mean
    return smooth(mean, seconds, JOB_TIME_RISE if rising else JOB_TIME_FALL)


class TypicalTime:
    """The cluster's typical job time: a slow mean over every node's results; and the time
    within which most recent jobs ended (`usual_longest`)."""

    def __init__(self) -> None:
        self.seconds: float | None = None
        self.results = 0  # results that went into it
        self.recent: deque[float] = deque(maxlen=RECENT_RESULTS)
        self._longest: float | None = None  # usual_longest, until the next result

    def observe(self, seconds: float) -> None:
        self.results += 1
        self.seconds = smooth(self.seconds, seconds,
                              max(TYPICAL_JOB_TIME_SMOOTHING, 1 / self.results))
        self.recent.append(seconds)
        self._longest = None

    def trusted(self) -> float | None:
        """The typical time once enough results went into it, else None."""
        return self.seconds if self.results >= TRUSTED_AFTER_RESULTS else None

    def usual_longest(self) -> float | None:
        """The time within which LONG_QUANTILE of the recent jobs ended (at least the
        typical time: all of it when the recent ones are not known, from an older proxy's
        store), once the typical time is trusted; else None."""
        typical = self.trusted()
        if typical is None or not self.recent:
            return typical
        if self._longest is None:  # ~8 us for 200; asked a few times per result at most
            ordered = sorted(self.recent)
            self._longest = ordered[min(len(ordered) - 1, int(LONG_QUANTILE * len(ordered)))]
        return max(typical, self._longest)

    def to_wire(self) -> list[Any]:
        return [self.seconds, self.results, list(self.recent)]

    @classmethod
    def from_wire(cls, value: Any) -> TypicalTime:
        typical = cls()
        typical.seconds, typical.results, *recent = value
        if recent:
            typical.recent.extend(float(s) for s in recent[0])
        return typical


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

    def to_wire(self) -> list[Any]:
        """[signature, runs] pairs, the least recently seen first."""
        return [[key, list(runs)] for key, runs in self._runs.items()]

    @classmethod
    def from_wire(cls, value: Any, max_signatures: int = MAX_SIGNATURES) -> JobTimes:
        times = cls(max_signatures)
        for key, runs in value[-max_signatures:]:
            times._runs[bytes(key)] = deque(runs, maxlen=WINDOW)
        return times

    def expected(self, spec: JobSpec) -> float | None:
        """The median of its recent runs, or None with fewer than MIN_RUNS of them."""
        runs = self._runs.get(signature(spec))
        if runs is None or len(runs) < MIN_RUNS:
            return None
        return statistics.median(runs)

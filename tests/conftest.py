from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.procs import Cluster, cluster_at

settings.register_profile("ci", deadline=None, print_blob=True)
settings.register_profile("long", deadline=None, max_examples=5000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with cluster_at(tmp_path) as c:
        yield c


@pytest.fixture
def need_nc() -> None:
    if shutil.which("nc") is None:
        pytest.skip("netcat (nc) is not installed: apt-get install netcat-openbsd")

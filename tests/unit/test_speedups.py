"""The shortcuts taken on hot paths give exactly what the plain code gave."""

from __future__ import annotations

import sys
from datetime import UTC, datetime

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster_node.jobtypes import decimal_text, iso
from common.packer import pack

# From 1970 to 2100, with the fractions that round up to the next second.
TIMES = st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False) | st.sampled_from(
    [0.0, 1.9999995, 1.0009995, 1764000000.9999996, 1764000000.0005])


@given(TIMES)
def test_iso_is_what_datetime_gives(ts: float) -> None:
    plain = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    assert iso(ts) == plain


MSGPACK_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner,
                                                                  max_size=5),
    max_leaves=20)


@given(MSGPACK_VALUES)
def test_pack_is_packb(value: object) -> None:
    assert pack(value) == msgpack.packb(value, use_bin_type=True)


def test_a_failed_pack_spoils_nothing_after_it() -> None:
    with pytest.raises(TypeError):
        pack({"a": [1, 2, object()]})
    assert pack({"b": [1, 2]}) == msgpack.packb({"b": [1, 2]}, use_bin_type=True)


@given(st.integers(0, 10**9) | st.integers(0, 10**25_000)
       | st.sampled_from([10**4000 - 1, 10**4000, 10**4000 + 1, 10**8000, 7 * 10**12_345]))
def test_decimal_text_is_str_without_its_digit_limit(value: int) -> None:
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        plain = str(value)
    finally:
        sys.set_int_max_str_digits(limit)
    assert decimal_text(value) == plain

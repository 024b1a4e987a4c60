"""``json_tensors.loads``: orjson where it reads a body as ``json`` would, and
``json`` for integers past 64 bits (which orjson would turn into floats)."""

from __future__ import annotations

import json

import pytest

from anyserve.codec.json_tensors import loads

EXACT = [
    b"18446744073709551616",
    b" -123456789012345678901",
    b'{"a": [1, 18446744073709551617]}',
    b"[0, 99999999999999999999999999999]",
]
FLOATS = [
    b"[0.00025383813065349425, 1.2345678901234567e-05, 0.13436424411240122]",
    b"[12345678901234567890123.5, 1e400, -0.0]",
    b'{"data": [3.14159265358979323846264338327950288]}',
]


@pytest.mark.parametrize("body", EXACT + FLOATS)
def test_the_same_as_json(body: bytes) -> None:
    got, want = loads(body), json.loads(body)
    assert got == want and repr(got) == repr(want)  # ints stay ints
    assert loads(body.decode()) == want


def test_integers_past_64_bits_stay_exact() -> None:
    assert loads(b"18446744073709551616") == 2**64
    assert loads(b'{"a": [1, -18446744073709551617]}') == {"a": [1, -(2**64) - 1]}


@pytest.mark.parametrize(
    "body", [FLOATS[0], b'{"x": [0.000000000000000000001, -2.50000000000000000000001]}']
)
def test_long_fractions_stay_on_orjson(body: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    # Long runs of digits after a "." (random floats) are no integer past 64
    # bits: orjson reads them, json is never called.
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("fell back to json")

    monkeypatch.setattr(json, "loads", refuse)  # the module json_tensors calls
    assert loads(body) is not None

"""Capability values, matching and header conversion."""

from __future__ import annotations

import pytest

from anyserve.capability import Capability, query_from_headers, query_to_metadata, rank
from anyserve.errors import InvalidArgument


def test_values_are_strings_and_keys_normalised() -> None:
    cap = Capability({"Type": "chat", "Max-Len": 2048, "fast": True})
    assert cap.to_dict() == {"type": "chat", "max_len": "2048", "fast": "true"}
    assert cap == {"type": "chat", "max_len": "2048", "fast": "true"}
    assert hash(cap) == hash(Capability(type="chat", max_len="2048", fast="true"))


def test_subset_matching_and_closest_match() -> None:
    chat = Capability(type="chat")
    chat_demo = Capability(type="chat", model="demo")
    embed = Capability(type="embed")
    assert chat_demo.matches({"type": "chat"})
    assert not chat.matches({"type": "chat", "model": "demo"})
    query = {"type": "chat"}
    assert rank(chat, query) == (0, 0)
    assert rank(chat_demo, query) == (0, 1)
    assert rank(embed, query) is None
    assert min([chat_demo, embed, chat], key=lambda c: rank(c, query) or (9, 9)) == chat
    # Without a query the model name decides: model before type, then fewer keys.
    assert rank(chat_demo, {}, "demo") == (0, 2)
    assert rank(chat, {}, "chat") == (1, 1)
    assert rank(chat_demo, {}, "chat") == (1, 2)
    assert rank(embed, {}, "chat") is None
    assert rank(chat, {}, "") is None


def test_model_name_addressing() -> None:
    assert Capability(type="chat", model="llama").serves_name("llama") == 2
    assert Capability(type="chat").serves_name("chat") == 1
    assert Capability(type="chat", model="llama").serves_name("chat") == 1
    assert Capability(type="embed").serves_name("chat") == 0
    assert Capability(type="chat", model="llama").name == "llama"


def test_headers_round_trip() -> None:
    headers = [("X-Capability-Type", "chat"), ("x-capability-max-len", " 7 "), ("Other", "x")]
    query = query_from_headers(headers)
    assert query == {"type": "chat", "max_len": "7"}
    assert query_from_headers(query_to_metadata(query)) == query


def test_parse_cli_form() -> None:
    assert Capability.parse("type=chat, model=demo") == Capability(type="chat", model="demo")
    for bad in ("", "type", "=x"):
        with pytest.raises(InvalidArgument):
            Capability.parse(bad)

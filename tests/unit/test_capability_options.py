"""@app.capability refuses mistakes when the handler is declared, naming the
key and the value (anyserve.handler_options)."""

from __future__ import annotations

from typing import Any

import pytest

from anyserve import AnyServe, Tensor
from anyserve.app import HandlerInfo
from anyserve.capability import Capability
from anyserve.handler_options import OPTIONS, close_option


def declare(**kwargs: Any) -> AnyServe:
    """An app with one handler declared with ``kwargs``."""
    app = AnyServe()

    def handler(request: Any) -> str:
        return ""

    app.capability(**kwargs)(handler)
    return app


# --------------------------------------------------------------------------- did you mean


@pytest.mark.parametrize(
    ("key", "value", "option"),
    [
        ("steam", True, "stream"),
        ("worker", 2, "workers"),
        ("max_batchsize", 8, "max_batch_size"),
        ("wokrers", 2, "workers"),
        ("max_concurency", 4, "max_concurrency"),
        ("resource", {"gpu": 1}, "resources"),
        ("preloads", False, "preload"),
        ("batch_timeuot", 0.01, "batch_timeout"),
        ("input", [Tensor("x", "FP32", [1])], "inputs"),
        ("start_timout", 30, "start_timeout"),
        ("nme", "x", "name"),
    ],
)
def test_a_mistyped_option_gets_did_you_mean(key: str, value: Any, option: str) -> None:
    with pytest.raises(ValueError, match=rf"did you mean `{option}`\?") as caught:
        declare(type="chat", **{key: value})
    assert f"@app.capability({key}={value!r})" in str(caught.value)


@pytest.mark.parametrize(
    "key", ["type", "model", "task", "lang", "language", "node", "gpus", "device", "version"]
)
def test_real_capability_keys_are_not_taken_for_typos(key: str) -> None:
    assert close_option(key) is None
    app = declare(**{key: "x"})
    assert dict(app.handlers[0].info.capability) == {key: "x"}


def test_a_string_key_close_to_an_option_that_takes_no_string_is_a_capability() -> None:
    # `input="image"` routes on the input kind: no mistyped `inputs=[...]` is a string
    assert (close_option("input"), close_option("team")) == ("inputs", "stream")
    app = declare(type="classify", input="image", output="label", team="nlp")
    assert app.handlers[0].info.capability == {
        "type": "classify",
        "input": "image",
        "output": "label",
        "team": "nlp",
    }
    with pytest.raises(ValueError, match="did you mean `inputs`"):
        declare(type="classify", input=1)


def test_close_option_scales_with_the_option_length() -> None:
    assert close_option("steam") == "stream"
    assert close_option("strem") == "stream"
    assert close_option("names") == "name"
    assert close_option("node") is None  # two edits from `name`: too far for four letters
    assert all(close_option(option) == option for option in OPTIONS)
    assert close_option("Max-Batch-Size") == "max_batch_size"


@pytest.mark.parametrize(
    ("key", "value"), [("Max-Batch-Size", 8), ("Stream", "yes"), ("Name", "x")]
)
def test_an_option_spelt_as_a_capability_key_is_refused(key: str, value: Any) -> None:
    # Only reachable through **{...}: the exact option names are the decorator's own
    option = key.lower().replace("-", "_")
    with pytest.raises(ValueError, match=rf"did you mean `{option}`\?"):
        declare(type="chat", **{key: value})


def test_an_empty_key_is_refused() -> None:
    with pytest.raises(ValueError, match="a capability key is a non-empty str, got ''"):
        declare(type="chat", **{"": "x"})


# --------------------------------------------------------------------------- capability values


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            True,
            r"fast=True\): a capability value is a str or an int, not a bool \(for the"
            r" text, write fast='true'\)",
        ),
        (None, r"fast=None\): a capability value is a str or an int, not NoneType"),
        (1.5, r"fast=1\.5\): a capability value is a str or an int, not float"),
        (["a"], r"fast=\['a'\]\): a capability value is a str or an int, not list"),
        ("", r"fast=''\): a capability value cannot be empty"),
        (" yes", r"surrounding spaces never match a header"),
        ("a,b", r"cannot hold ','"),
        ("a\nb", r"cannot hold control characters"),
    ],
)
def test_capability_values_are_strings_or_ints(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        declare(type="chat", fast=value)


def test_int_values_match_as_their_decimal_string() -> None:
    info = declare(type="chat", gpus=2, offset=-1).handlers[0].info
    assert info.capability == {"type": "chat", "gpus": "2", "offset": "-1"}
    assert info.capability.matches({"gpus": "2"})


def test_keys_that_normalise_alike_are_refused() -> None:
    with pytest.raises(ValueError, match=r"keys 'model' and 'Model' are the same capability key"):
        declare(type="chat", model="a", Model="b")


def test_capability_itself_stays_lenient() -> None:
    # Registration JSON and clients still give booleans and numbers.
    assert Capability({"fast": True, "n": 2.5}).to_dict() == {"fast": "true", "n": "2.5"}


# --------------------------------------------------------------------------- option values


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"stream": "yes"}, r"stream must be True or False, got 'yes'"),
        ({"workers": "2"}, r"workers must be an int >= 0 \(0: none at boot\), got '2'"),
        ({"workers": -1}, r"workers must be an int >= 0"),
        ({"workers": True}, r"workers must be an int >= 0 .*, got True"),
        ({"workers": 1.0}, r"workers must be an int >= 0 .*, got 1\.0"),
        ({"max_concurrency": 0}, r"max_concurrency must be an int >= 1, or None .*, got 0"),
        ({"max_concurrency": "8"}, r"max_concurrency must be an int >= 1"),
        ({"resources": ["gpu"]}, r"resources must be a mapping .*, got \['gpu'\]"),
        ({"resources": {"gpu": -1}}, r"resources\['gpu'\] must be a number >= 0, got -1"),
        ({"resources": {"gpu": "1"}}, r"resources\['gpu'\] must be a number >= 0, got '1'"),
        ({"resources": {"gpu": True}}, r"resources\['gpu'\] must be a number >= 0, got True"),
        ({"resources": {"gpu": float("nan")}}, r"resources\['gpu'\] must be a number >= 0"),
        ({"resources": {"": 1}}, r"a resources name must be a non-empty str, got ''"),
        ({"preload": "no"}, r"preload must be True or False, got 'no'"),
        ({"preload": 0}, r"preload must be True or False, got 0"),
        ({"name": ""}, r"name must be a non-empty str, got ''"),
        ({"name": 3}, r"name must be a non-empty str, got 3"),
        ({"max_batch_size": -1}, r"max_batch_size must be an int >= 0 \(0: no batching\)"),
        ({"max_batch_size": 2.0}, r"max_batch_size must be an int >= 0"),
        ({"max_batch_size": 2, "stream": True}, r"streaming handlers are not batched"),
        ({"batch_timeout": 61}, r"batch_timeout must be seconds between 0 and 60, got 61"),
        ({"batch_timeout": "0.1"}, r"batch_timeout must be seconds between 0 and 60"),
        ({"start_timeout": 0}, r"start_timeout must be seconds > 0, or None .*, got 0"),
        ({"start_timeout": -5.0}, r"start_timeout must be seconds > 0"),
        ({"start_timeout": "60"}, r"start_timeout must be seconds > 0"),
        ({"start_timeout": float("inf")}, r"start_timeout must be seconds > 0"),
        ({"inputs": Tensor("x", "FP32", [1])}, r"inputs must be a list of anyserve\.Tensor"),
    ],
)
def test_option_values_are_checked(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=r"^@app\.capability: " + message):
        declare(type="chat", **options)


def test_good_options_reach_the_handler_info() -> None:
    app = declare(
        type="chat",
        workers=0,
        max_concurrency=2,
        resources={"gpu": 1, "mem": 0.5},
        preload=False,
        name="chatty",
        start_timeout=30,
    )
    info = app.handler("chatty").info
    assert (info.workers, info.max_concurrency, info.preload) == (0, 2, False)
    assert dict(info.resources) == {"gpu": 1.0, "mem": 0.5}
    assert info.start_timeout == 30.0
    assert HandlerInfo.from_dict(info.to_dict()) == info
    assert declare(type="chat").handlers[0].info.start_timeout is None

"""The control plane's rules: who may register, and what a registration may say."""

from __future__ import annotations

import pytest

from anyserve.api_server import guard
from anyserve.api_server.config import ApiServerConfig
from anyserve.errors import InvalidArgument


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("example.org", False),
        (None, False),
    ],
)
def test_loopback(host: str | None, loopback: bool) -> None:
    assert guard.is_loopback(host) is loopback


@pytest.mark.parametrize(
    "endpoint",
    ["unix:/x", "unix:///tmp/s.sock", "http://h:1", "h", "h:", ":80", "h:0", "h:70000",
     "h:p", "::1:50051", "a/b:1", "h h:1", "h@evil:1"],
)  # fmt: skip
def test_endpoints_must_be_host_and_port(endpoint: str) -> None:
    with pytest.raises(InvalidArgument, match="endpoint"):
        guard.check_endpoint(endpoint, ())


@pytest.mark.parametrize("endpoint", ["127.0.0.1:50051", "replica-1.local:9000", "[::1]:50051"])
def test_good_endpoints_pass(endpoint: str) -> None:
    assert guard.check_endpoint(endpoint, ()) == endpoint


def test_replica_networks_limit_endpoints() -> None:
    networks = guard.parse_networks(["10.0.0.0/8", "fd00::/8"])
    assert guard.check_endpoint("10.2.3.4:50051", networks) == "10.2.3.4:50051"
    assert guard.check_endpoint("[fd00::5]:1", networks) == "[fd00::5]:1"
    with pytest.raises(InvalidArgument, match="outside the replica networks"):
        guard.check_endpoint("192.168.1.1:50051", networks)
    with pytest.raises(InvalidArgument, match="must be an IP address"):
        guard.check_endpoint("replica.local:50051", networks)
    with pytest.raises(ValueError, match="not a network"):
        guard.parse_networks(["10.0.0.0/33"])


def test_capabilities_are_bounded() -> None:
    guard.check_capability_size("capabilities", 0, {"type": "chat"})
    with pytest.raises(InvalidArgument, match="at most 64"):
        guard.check_capability_size("capabilities", 3, {"k" * 65: "v"})
    with pytest.raises(InvalidArgument, match="capabilities\\[3\\]"):
        guard.check_capability_size("capabilities", 3, {"k": "v" * 257})


def test_a_non_loopback_host_needs_a_token_or_the_explicit_flag() -> None:
    with pytest.raises(ValueError, match=r"refusing to serve on 0\.0\.0\.0 without a token"):
        ApiServerConfig(host="0.0.0.0", token=None)
    assert ApiServerConfig(host="0.0.0.0", token="t").token == "t"
    assert ApiServerConfig(host="0.0.0.0", token=None, insecure_register=True).insecure_register
    assert ApiServerConfig(host="127.0.0.1", token=None).host == "127.0.0.1"
    with pytest.raises(ValueError, match="not a network"):
        ApiServerConfig(replica_networks=("nonsense",))

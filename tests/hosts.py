"""Separate network stacks for tests: Linux network namespaces as hosts.

``two_hosts()`` makes two namespaces joined by a veth pair, each with its own
address on a private /24 that exists only inside them, and removes them
afterwards. Traffic to those addresses is sent only from inside a namespace
(``run_in``/``spawn_in`` wrap commands in ``ip netns exec``). Tests that need
it skip with a clear reason where namespaces cannot be created (not root, no
``ip``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class Host:
    """One namespace: its name and its address on the link."""

    netns: str
    address: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's network namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


def namespaces_unavailable() -> str | None:
    """Why namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"anyserve-probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"cannot create a network namespace: {exc}"
    _ip("netns", "del", probe)
    return None


@contextmanager
def two_hosts(subnet: int) -> Iterator[tuple[Host, Host]]:
    """Two namespaces linked by a veth pair: 10.213.<subnet>.1 and .2 (/24).

    Skips the calling test when namespaces are unavailable.
    """
    reason = namespaces_unavailable()
    if reason is not None:
        pytest.skip(reason)
    tag = f"{os.getpid() % 100000}{subnet}"
    hosts = (
        Host(f"anyserve-{tag}-a", f"10.213.{subnet}.1"),
        Host(f"anyserve-{tag}-b", f"10.213.{subnet}.2"),
    )
    veths = (f"vas{tag}a", f"vas{tag}b")  # interface names: at most 15 characters
    try:
        for host in hosts:
            _ip("netns", "add", host.netns)
            _ip("-n", host.netns, "link", "set", "lo", "up")
        _ip("link", "add", veths[0], "netns", hosts[0].netns, "type", "veth",
            "peer", "name", veths[1], "netns", hosts[1].netns)  # fmt: skip
        for host, veth in zip(hosts, veths, strict=True):
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", veth)
            _ip("-n", host.netns, "link", "set", veth, "up")
        yield hosts
    finally:
        for host in hosts:  # deleting a namespace deletes its end of the link
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True, timeout=10)

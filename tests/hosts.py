"""Separate network stacks for tests: Linux network namespaces as hosts.

``two_hosts()`` makes two namespaces joined by a veth pair, ``hosts(subnet, n)``
n namespaces on one bridge (it lives in the first one); each has its own
address on a private /24 that exists only inside them, and they are removed
afterwards, even when the test fails. Traffic to those addresses is sent only
from inside a namespace (``Host.command`` wraps a command in ``ip netns
exec``). Tests that need it skip with a clear reason where namespaces cannot
be created (not root, no ``ip``).
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


@contextmanager
def hosts(subnet: int, n: int) -> Iterator[tuple[Host, ...]]:
    """``n`` namespaces on one link: 10.213.<subnet>.1 .. .n (/24).

    The first namespace holds a bridge (with its address); every other one is
    joined to it by a veth pair, so all of them reach each other and nothing is
    added to the machine's own network stack. Skips the calling test when
    namespaces are unavailable.
    """
    if not 2 <= n <= 9:
        raise ValueError(f"between 2 and 9 hosts, not {n}")
    reason = namespaces_unavailable()
    if reason is not None:
        pytest.skip(reason)
    tag = f"{os.getpid() % 100000}{subnet}"
    made = tuple(Host(f"anyserve-{tag}-{i}", f"10.213.{subnet}.{i + 1}") for i in range(n))
    hub, bridge = made[0], f"vbr{tag}"  # interface names: at most 15 characters
    try:
        for host in made:
            _ip("netns", "add", host.netns)
            _ip("-n", host.netns, "link", "set", "lo", "up")
        _ip("-n", hub.netns, "link", "add", bridge, "type", "bridge")
        _ip("-n", hub.netns, "addr", "add", f"{hub.address}/24", "dev", bridge)
        _ip("-n", hub.netns, "link", "set", bridge, "up")
        for i, host in enumerate(made[1:], start=1):
            inner, outer = f"vas{tag}p{i}", f"vas{tag}h{i}"
            _ip("link", "add", inner, "netns", host.netns, "type", "veth",
                "peer", "name", outer, "netns", hub.netns)  # fmt: skip
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", inner)
            _ip("-n", host.netns, "link", "set", inner, "up")
            _ip("-n", hub.netns, "link", "set", outer, "master", bridge)
            _ip("-n", hub.netns, "link", "set", outer, "up")
        yield made
    finally:
        for host in made:  # deleting a namespace deletes its interfaces (and the bridge)
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True, timeout=10)

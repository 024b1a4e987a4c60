"""Who may use the control plane, and what a registration may say.

Secure by default:

* With a token (``--token`` / ``$ANYSERVE_TOKEN``), ``/register`` and
  ``/unregister`` need ``Authorization: Bearer <token>``.
* Without one, they are accepted only from this machine (loopback clients): a
  replica on another host needs the token. The server refuses to listen on a
  non-loopback address without a token unless ``--insecure-register`` says the
  operator knows (registration then still stays local).
* A registered endpoint is ``host:port`` and nothing else (no scheme, no
  ``unix:`` path: the API server dials it), optionally inside
  ``--replica-networks``.
* A registration carries at most :data:`MAX_CAPABILITIES` capabilities with
  bounded keys and values, so one registration cannot slow routing for all.
* ``/registry`` shows endpoints and pids only to callers with the token, when
  one is set.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable

from starlette.requests import Request

from anyserve.errors import InvalidArgument, Unauthenticated

MAX_CAPABILITIES = 256
MAX_KEY = 64
MAX_VALUE = 256

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (an address, as a client or a bind address) is this machine only."""
    if host in ("localhost",):
        return True
    try:
        address = ipaddress.ip_address((host or "").strip("[]"))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def parse_networks(items: Iterable[str]) -> tuple[Network, ...]:
    """``10.0.0.0/8,fd00::/8`` pieces -> networks; ValueError naming a bad one."""
    networks: list[Network] = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not a network (CIDR): {item!r}") from None
    return tuple(networks)


def has_token(token: str | None, request: Request) -> bool:
    """Whether the request carries ``Authorization: Bearer <token>`` (constant time)."""
    if not token:
        return False
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )


def authorize_control(token: str | None, request: Request) -> None:
    """Raise Unauthenticated unless the caller may register or unregister."""
    if token:
        if not has_token(token, request):
            raise Unauthenticated("missing or wrong token (Authorization: Bearer <token>)")
        return
    client = request.client.host if request.client else None
    if not is_loopback(client):
        raise Unauthenticated(
            f"registration from {client or 'an unknown address'} refused: without a token the"
            " API server takes registrations from this machine only (start it with --token"
            " and give replicas the same token)"
        )


def check_endpoint(endpoint: str, networks: tuple[Network, ...]) -> str:
    """A registered endpoint: ``host:port`` (``[v6]:port``) only, inside
    ``networks`` when any are given. Raises InvalidArgument."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"'endpoint' must be host:port, got {endpoint!r}")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if "/" in bare or (":" in bare and not host.startswith("[")) or not bare.strip():
        raise InvalidArgument(f"'endpoint' must be host:port, got {endpoint!r}")
    if not all(c.isalnum() or c in "-._:" for c in bare):
        raise InvalidArgument(f"'endpoint' host {bare!r} is not a host name or address")
    if networks:
        try:
            address = ipaddress.ip_address(bare)
        except ValueError:
            raise InvalidArgument(
                f"'endpoint' must be an IP address inside {', '.join(map(str, networks))}"
                f" (--replica-networks), got {endpoint!r}"
            ) from None
        if not any(address in network for network in networks):
            raise InvalidArgument(
                f"'endpoint' {endpoint!r} is outside the replica networks"
                f" {', '.join(map(str, networks))}"
            )
    return endpoint


def check_capability_size(key: str, index: int, items: dict[str, object]) -> None:
    """Bounds one registered capability; raises InvalidArgument."""
    for name, value in items.items():
        if len(str(name)) > MAX_KEY or len(str(value)) > MAX_VALUE:
            raise InvalidArgument(
                f"{key}[{index}]: keys are at most {MAX_KEY} characters and values {MAX_VALUE}"
            )

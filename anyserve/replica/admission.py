"""Admission: whether a call may join a worker's queue.

A worker runs ``capacity`` calls at once (``max_concurrency``, times
``max_batch_size`` for a batched handler: a call is one batch item) and holds
up to ``max_queue`` more waiting. A call is refused (Overloaded, 429) only
when that queue is full, or when the call would still be waiting when its
deadline passes: queueing it would only turn a prompt "retry later" into a
late 504 and take a place from a call that can still make it.

The wait is estimated from the handler's service time (an exponential
moving average over finished unary calls, corrected for the time each one
spent queued) and the number of calls ahead of this one. Before the first
call has finished nothing is known, and only the queue length is checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from anyserve.app import HandlerInfo
from anyserve.errors import Overloaded

# Weight of the newest sample in the service-time average.
_ALPHA = 0.2


def capacity(handler: HandlerInfo) -> int:
    """Calls one worker of ``handler`` runs at once."""
    return handler.max_concurrency * max(1, handler.max_batch_size)


@dataclass(frozen=True, slots=True)
class Ticket:
    """One admitted call: what :meth:`Admission.finished` needs to learn from it."""

    handler: str
    rounds: int  # service rounds it waited before running (0: ran at once)


class Admission:
    """Per-handler service times and the admission check of one replica.

    Not thread-safe: used from the replica's event loop only.
    """

    def __init__(self) -> None:
        self._service: dict[str, float] = {}
        # Per handler, the ticket of a call that runs at once (most calls):
        # one made per call is a third of admit's cost.
        self._at_once: dict[str, Ticket] = {}

    def service_time(self, handler: str) -> float | None:
        """Seconds one call of ``handler`` takes once running (None: not known yet)."""
        return self._service.get(handler)

    def admit(self, handler: HandlerInfo, inflight: int, timeout: float | None) -> Ticket:
        """Admit a call to a worker that has ``inflight`` calls already.

        ``timeout``: seconds left before the call's deadline (None: none).
        Raises Overloaded, with a Retry-After of about one service round, when
        the worker's queue is full or the call could not start in time.
        """
        cap = capacity(handler)
        queued = inflight - cap + 1  # this call's place in the queue (<= 0: runs at once)
        if queued <= 0 <= handler.max_queue:  # runs at once: nothing to check
            ticket = self._at_once.get(handler.name)
            if ticket is None:
                ticket = self._at_once[handler.name] = Ticket(handler.name, 0)
            return ticket
        rounds = math.ceil(queued / cap) if queued > 0 else 0
        service = self._service.get(handler.name)
        retry_after = max(1.0, service or 0.0)
        if queued > handler.max_queue:
            raise Overloaded(
                f"handler {handler.name} has {inflight - cap} calls queued on its least busy"
                f" worker (max_queue {handler.max_queue})",
                retry_after,
            )
        if rounds and timeout is not None and service is not None:
            wait = rounds * service
            if wait > timeout:
                raise Overloaded(
                    f"handler {handler.name} could start this call in about {wait:.3g} s"
                    f" ({queued} calls ahead of it); its deadline is {timeout:.3g} s away",
                    retry_after,
                )
        return Ticket(handler.name, rounds)

    def finished(self, ticket: Ticket, elapsed: float) -> None:
        """Learn from an admitted call that ran to completion in ``elapsed`` s
        (queue wait included)."""
        sample = elapsed / (ticket.rounds + 1)
        old = self._service.get(ticket.handler)
        self._service[ticket.handler] = sample if old is None else old + _ALPHA * (sample - old)

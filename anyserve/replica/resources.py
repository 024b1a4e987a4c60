"""Resource accounting: what a replica's declared ``--resources`` have left, and
which idle workers to stop to make room for another handler ("switching").

A slot holds its handler's ``resources`` from the moment it is wanted until
its process has exited, so the declared resources are never exceeded, not even
while a worker drains to make room for another. A replica that declares no
resources has no limit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet

from anyserve.app import HandlerInfo
from anyserve.replica.slot import Slot, State

# Slack for float sums (0.1 + 0.2 of a GPU fits in 0.3).
EPSILON = 1e-9


class ResourceBudget:
    """The declared resources of a replica against what its slots hold.

    ``slots`` is the manager's live table (handler name -> its slots); the
    budget reads it on every question and never changes it.
    """

    def __init__(self, total: Mapping[str, float], slots: Mapping[str, Sequence[Slot]]) -> None:
        self.total = dict(total)
        self._slots = slots

    def used(self, exclude: AbstractSet[str] = frozenset()) -> dict[str, float]:
        """What the slots hold now, leaving out the slots whose ids are in ``exclude``."""
        used: dict[str, float] = {}
        for slots in self._slots.values():
            for slot in slots:
                if slot.holds_resources and slot.id not in exclude:
                    for key, amount in slot.handler.resources.items():
                        used[key] = used.get(key, 0.0) + amount
        return used

    def free(self) -> dict[str, float]:
        """What the declared resources have left."""
        used = self.used()
        return {key: total - used.get(key, 0.0) for key, total in self.total.items()}

    def fits(
        self, handler: HandlerInfo, count: int = 1, exclude: AbstractSet[str] = frozenset()
    ) -> bool:
        """Whether ``count`` more workers of ``handler`` fit (with the slots in
        ``exclude`` gone)."""
        if not self.total or not handler.resources:
            return True
        used = self.used(exclude)
        return all(
            used.get(key, 0.0) + need * count <= self.total.get(key, 0.0) + EPSILON
            for key, need in handler.resources.items()
        )

    def exceeds_total(self, handler: HandlerInfo) -> bool:
        """Whether one worker of ``handler`` needs more than the replica has in
        all (it can never run here, whatever is stopped)."""
        return bool(self.total) and any(
            need > self.total.get(key, 0.0) + EPSILON for key, need in handler.resources.items()
        )

    def victims(self, handler: HandlerInfo) -> list[Slot] | None:
        """Idle workers of other handlers whose stopping makes room for one
        worker of ``handler`` (none when it fits already), or None when even
        stopping every idle one would not.

        Idle means wanted, READY and without calls in flight; only workers
        holding a resource ``handler`` needs are chosen, in handler order,
        stopping as soon as there is room.
        """
        chosen: set[str] = set()
        victims: list[Slot] = []
        for name, slots in self._slots.items():
            if name == handler.name:
                continue
            for slot in slots:
                if self.fits(handler, exclude=chosen):
                    return victims
                overlaps = any(k in handler.resources for k in slot.handler.resources)
                idle = slot.wanted and slot.state is State.READY and slot.inflight == 0
                if idle and overlaps:
                    chosen.add(slot.id)
                    victims.append(slot)
        return victims if self.fits(handler, exclude=chosen) else None

"""Resource accounting: what is free, what fits, which idle workers make room."""

from __future__ import annotations

from anyserve.app import HandlerInfo
from anyserve.replica.resources import ResourceBudget
from anyserve.replica.slot import Slot
from tests.unit.replica_fakes import handler, ready_slot

GPU = {"gpu": 1.0}


class Table:
    """A manager's slot table, filled by hand."""

    def __init__(self, *handlers: HandlerInfo) -> None:
        self.slots: dict[str, list[Slot]] = {h.name: [] for h in handlers}

    def ready(self, info: HandlerInfo) -> Slot:
        slot, _ = ready_slot(info, f"{info.name}-{len(self.slots[info.name])}")
        self.slots[info.name].append(slot)
        return slot

    def busy(self, info: HandlerInfo) -> Slot:
        slot = self.ready(info)
        slot.open_call(b"", stream=False, metadata={}, timeout=1.0)
        return slot

    def starting(self, info: HandlerInfo) -> Slot:
        slot = Slot(f"{info.name}-{len(self.slots[info.name])}", info)
        slot.start()
        self.slots[info.name].append(slot)
        return slot


A, B = handler("a", resources=GPU), handler("b", resources=GPU)
BIG = handler("big", resources={"gpu": 2.0})
MEM = handler("mem", resources={"mem": 4.0})
FREE = handler("free")


def test_a_replica_without_declared_resources_has_no_limit() -> None:
    table = Table(A, BIG)
    table.ready(A)
    budget = ResourceBudget({}, table.slots)
    assert budget.free() == {}
    assert budget.fits(BIG, count=10) and not budget.exceeds_total(BIG)
    assert budget.victims(BIG) == []


def test_free_and_fits_count_what_slots_hold() -> None:
    table = Table(A, B, FREE)
    budget = ResourceBudget({"gpu": 2.0, "mem": 8.0}, table.slots)
    assert budget.free() == {"gpu": 2.0, "mem": 8.0}
    assert budget.fits(A, count=2) and not budget.fits(A, count=3)
    table.ready(A)
    assert budget.used() == {"gpu": 1.0}
    assert budget.free() == {"gpu": 1.0, "mem": 8.0}
    assert budget.fits(B) and not budget.fits(B, count=2)
    table.starting(B)  # a starting worker holds its resources already
    assert budget.free() == {"gpu": 0.0, "mem": 8.0}
    assert not budget.fits(A)
    assert budget.fits(FREE, count=100)  # needs nothing


def test_a_draining_worker_holds_its_resources_until_it_has_exited() -> None:
    table = Table(A)
    budget = ResourceBudget({"gpu": 1.0}, table.slots)
    slot = table.ready(A)
    slot.begin_drain()
    assert not slot.wanted and budget.free() == {"gpu": 0.0}
    slot.supervision_ended()
    assert budget.free() == {"gpu": 1.0}


def test_fits_with_some_slots_gone() -> None:
    table = Table(A, B)
    budget = ResourceBudget({"gpu": 1.0}, table.slots)
    slot = table.ready(A)
    assert not budget.fits(B)
    assert budget.fits(B, exclude={slot.id})
    assert budget.used(exclude={slot.id}) == {}


def test_fractions_add_up() -> None:
    tenth, fifth = handler("t", resources={"gpu": 0.1}), handler("f", resources={"gpu": 0.2})
    table = Table(tenth, fifth)
    table.ready(tenth)
    assert ResourceBudget({"gpu": 0.3}, table.slots).fits(fifth)


def test_exceeds_total() -> None:
    budget = ResourceBudget({"gpu": 1.0}, {})
    assert budget.exceeds_total(BIG)
    assert not budget.exceeds_total(A)
    assert budget.exceeds_total(MEM)  # a resource the replica does not have at all
    assert not budget.exceeds_total(FREE)


def test_victims_are_idle_ready_workers_of_other_handlers() -> None:
    table = Table(A, B)
    budget = ResourceBudget({"gpu": 1.0}, table.slots)
    idle = table.ready(A)
    assert budget.victims(B) == [idle]


def test_no_victims_when_it_fits_already() -> None:
    table = Table(A, B)
    table.ready(A)
    assert ResourceBudget({"gpu": 2.0}, table.slots).victims(B) == []


def test_busy_and_starting_workers_are_never_victims() -> None:
    table = Table(A, B)
    budget = ResourceBudget({"gpu": 1.0}, table.slots)
    table.busy(A)
    assert budget.victims(B) is None
    table = Table(A, B)
    table.starting(A)
    assert ResourceBudget({"gpu": 1.0}, table.slots).victims(B) is None


def test_only_workers_holding_a_needed_resource_are_victims() -> None:
    table = Table(MEM, A, B)
    budget = ResourceBudget({"gpu": 1.0, "mem": 4.0}, table.slots)
    table.ready(MEM)  # idle, but holds no gpu
    gpu_holder = table.ready(A)
    assert budget.victims(B) == [gpu_holder]


def test_the_handlers_own_workers_are_never_victims() -> None:
    table = Table(A)
    table.ready(A)
    assert ResourceBudget({"gpu": 1.0}, table.slots).victims(A) is None


def test_victims_stop_as_soon_as_there_is_room() -> None:
    table = Table(A, B, BIG)
    budget = ResourceBudget({"gpu": 3.0}, table.slots)
    first = table.ready(A)
    other = table.ready(B)
    # One gpu is free: BIG needs one more, so the first idle worker is enough.
    assert budget.victims(BIG) == [first]
    second = table.ready(A)
    # None is free now: two must go, chosen in handler order.
    assert budget.victims(BIG) == [first, second]
    assert other.wanted


def test_not_enough_idle_workers_means_no_victims_at_all() -> None:
    table = Table(A, B, BIG)
    budget = ResourceBudget({"gpu": 2.0}, table.slots)
    table.ready(A)
    table.busy(B)
    assert budget.victims(BIG) is None

"""Placing a bulk job's writers on Ray (genmodels.bulk.on_ray._place_writers) over a fake
placement group (no Ray started): a cancelled job stops waiting for CPUs at once."""

from __future__ import annotations

import importlib
import threading
import time

import pytest

from genmodels.bulk import on_ray


class _BusyCluster:
    """Ray whose free-CPU view says 2 while no bundle can be placed (another job took the CPUs):
    each ``ray.wait`` on a group's ``ready()`` blocks for its whole timeout, as Ray's does, and the
    group is placed after ``placed_after`` waits. (Not ``group.wait``: Ray 2.60 truncates its
    timeout to whole seconds; tests/integration/test_bulk_ray.py has that on a real cluster.)"""

    def __init__(self, placed_after: int | None = None):
        self.placed_after, self.waits, self.asked, self.removed = placed_after, [], [], 0

    def available_resources(self):
        return {"CPU": 2.0}

    def placement_group(self, bundles, strategy):
        self.asked.append(len(bundles))
        cluster = self

        class Group:
            def ready(self):
                return self

        return Group()

    def wait(self, refs, timeout):
        self.waits.append(timeout)
        if self.placed_after is not None and len(self.waits) >= self.placed_after:
            return list(refs), []
        time.sleep(timeout)
        return [], list(refs)

    def remove_placement_group(self, group):
        self.removed += 1


@pytest.fixture()
def cluster(monkeypatch):
    def make(placed_after=None) -> _BusyCluster:
        fake = _BusyCluster(placed_after)
        pg = importlib.import_module("ray.util.placement_group")  # the module; ray.util's attribute is the function
        monkeypatch.setattr(pg, "placement_group", fake.placement_group)
        monkeypatch.setattr(pg, "remove_placement_group", fake.remove_placement_group)
        return fake

    return make


def test_a_cancel_while_writers_wait_for_cpus_is_seen_within_a_poll(cluster):
    fake = cluster()
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()  # the client's DELETE, 0.2 s in
    start = time.monotonic()
    assert on_ray._place_writers(fake, 2, cancel.is_set) == (None, 0)
    assert time.monotonic() - start < 0.2 + 0.5  # was PLACEMENT_TIMEOUT_S (5 s) per try
    assert fake.asked == [2] and fake.removed == 1


def test_placement_still_gets_the_whole_timeout(cluster, monkeypatch):
    monkeypatch.setattr(on_ray, "PLACEMENT_TIMEOUT_S", 0.5)
    monkeypatch.setattr(on_ray, "_POLL_S", 0.05)
    fake = cluster(placed_after=7)  # placed in the 7th wait of the first try (of 10)
    group, count = on_ray._place_writers(fake, 2, lambda: False)
    assert group is not None and count == 2 and fake.removed == 0
    fake = cluster()  # never: each try waits the timeout, then half as many writers are asked for
    assert on_ray._place_writers(fake, 2, None) == (None, 0)
    assert fake.asked == [2, 1] and fake.waits == [0.05] * 20 and fake.removed == 2

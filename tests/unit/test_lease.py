"""Leases in the platform storage (file:// and S3 over HTTP): one holder at a time, expiry and
take-over, renewal, and a holder that lost its lease finding out."""

from __future__ import annotations

import threading
import time

import pytest

from genmodels.lease import Lease, LeaseBusy, LeaseLost
from genmodels.storage import open_storage


@pytest.fixture(params=["file", "s3"])
def storage(request, tmp_path):
    if request.param == "file":
        return open_storage(tmp_path / "store")
    return open_storage(request.getfixturevalue("s3_bucket"))


def test_one_holder_at_a_time_and_release_frees_it(storage):
    first = Lease(storage, "retrain/digits/vae", ttl_s=30).acquire()
    with pytest.raises(LeaseBusy, match=first.owner):
        Lease(storage, "retrain/digits/vae", ttl_s=30).acquire()
    with Lease(storage, "retrain/digits/gan", ttl_s=30):  # another name: independent
        pass
    first.release()
    with Lease(storage, "retrain/digits/vae", ttl_s=30) as second:
        assert second.holder()["owner"] == second.owner
    assert second.holder() is None


def test_a_holder_that_stopped_renewing_is_taken_over_and_finds_out(tmp_path):
    storage = open_storage(tmp_path / "store")
    # TTLs of seconds, not tenths: a renewer thread stalled by a busy 2-core machine must not
    # look like a dead holder.
    stalled = Lease(storage, "promote/m", ttl_s=2.0).acquire()
    stalled._stop.set()  # as a killed or frozen process: no more renewals
    with pytest.raises(LeaseBusy):
        Lease(storage, "promote/m", ttl_s=2.0).acquire()
    taker = Lease(storage, "promote/m", ttl_s=30, wait_s=10).acquire()
    assert taker.generation == stalled.generation + 1
    with pytest.raises(LeaseLost):
        stalled.check()
    stalled.release()  # must not free the taker's lease
    assert Lease(storage, "promote/m").holder()["owner"] == taker.owner
    taker.release()


def test_a_live_holder_keeps_its_lease_past_the_ttl_by_renewing(tmp_path):
    storage = open_storage(tmp_path / "store")
    with Lease(storage, "n", ttl_s=2.0) as holder:  # renewed every 0.5 s: a 1.5 s stall is tolerated
        time.sleep(4.0)
        holder.check()
        with pytest.raises(LeaseBusy):
            Lease(storage, "n", ttl_s=2.0).acquire()


def test_leaving_the_block_logs_a_failed_release_and_the_lease_expires_by_its_ttl(tmp_path, monkeypatch, caplog):
    storage = open_storage(tmp_path / "store")
    real_put = type(storage).put_bytes

    def put_bytes(self, key, data):
        if b'"released": true' in data:
            raise ConnectionError("connection reset while releasing the lease")
        return real_put(self, key, data)

    with Lease(storage, "promote/m", ttl_s=2.0):
        monkeypatch.setattr(type(storage), "put_bytes", put_bytes)
    assert "could not release" in caplog.text and "promote/m" in caplog.text
    monkeypatch.undo()
    taker = Lease(storage, "promote/m", ttl_s=30, wait_s=10).acquire()  # once the TTL has run out
    assert taker.generation == 2
    taker.release()


class _StallsBeforeCreating:
    """A storage through which an acquirer stalls between reading the newest generation and
    creating the next one, while ``meanwhile`` runs."""

    def __init__(self, storage, meanwhile):
        self._storage, self._meanwhile = storage, meanwhile

    def create_exclusive(self, key, data):
        if self._meanwhile is not None:
            self._meanwhile, meanwhile = None, self._meanwhile
            meanwhile()
        return self._storage.create_exclusive(key, data)

    def __getattr__(self, name):
        return getattr(self._storage, name)


def test_an_acquirer_that_stalled_does_not_take_a_generation_removed_as_old(tmp_path):
    storage = open_storage(tmp_path / "store")
    holder = []

    def others_take_it_three_times():
        # The third taker removes generation 1 as old: the stalled acquirer can create it again.
        for _ in range(2):
            Lease(storage, "promote/m", ttl_s=30).acquire().release()
        holder.append(Lease(storage, "promote/m", ttl_s=30).acquire())

    stalled = Lease(_StallsBeforeCreating(storage, others_take_it_three_times), "promote/m", ttl_s=30)
    with pytest.raises(LeaseBusy, match=r"held by .*:[0-9a-f]{8}"):
        stalled.acquire()
    assert holder[0].generation == 3 and Lease(storage, "promote/m").holder()["owner"] == holder[0].owner
    holder[0].release()


def test_a_lease_taken_again_after_its_release_is_renewed_again(tmp_path):
    storage = open_storage(tmp_path / "store")
    lease = Lease(storage, "n", ttl_s=2.0)
    with lease:
        pass
    with lease:  # renewed every 0.5 s again: a 1.5 s stall is tolerated
        time.sleep(4.0)
        lease.check()
        with pytest.raises(LeaseBusy):
            Lease(storage, "n", ttl_s=2.0).acquire()


def test_a_renewal_still_writing_when_the_block_ends_lands_before_the_release(tmp_path, monkeypatch):
    storage = open_storage(tmp_path / "store")
    real_put = type(storage).put_bytes
    renewing = threading.Event()

    def slow_renewal(self, key, data):
        if threading.current_thread().name.startswith("lease-"):
            renewing.set()
            time.sleep(6.0)  # one slow PUT (retries, a stalled connection): longer than the renewer's join
        return real_put(self, key, data)

    # Renewed every 2 s; the slow renewal's expiry (8 s after it began) outlasts its 6 s write.
    with Lease(storage, "retrain/ds/vae", ttl_s=8.0):
        monkeypatch.setattr(type(storage), "put_bytes", slow_renewal)
        assert renewing.wait(10)
    monkeypatch.undo()
    time.sleep(1.5)  # past the slow write's end, had it outlived the release
    assert Lease(storage, "retrain/ds/vae").holder() is None  # released, and stays so
    with Lease(storage, "retrain/ds/vae", ttl_s=30) as next_retrain:
        assert next_retrain.generation == 2


def test_an_acquirer_that_lost_the_race_names_the_winner(tmp_path):
    storage = open_storage(tmp_path / "store")
    Lease(storage, "retrain/ds/vae", ttl_s=30, owner="old-holder").acquire().release()
    winner = []
    racing = Lease(_StallsBeforeCreating(storage, lambda: winner.append(
        Lease(storage, "retrain/ds/vae", ttl_s=30, owner="winner").acquire())), "retrain/ds/vae", ttl_s=30)
    with pytest.raises(LeaseBusy, match="held by winner "):
        racing.acquire()
    winner[0].release()

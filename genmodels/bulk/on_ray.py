"""Shards on a pool of one-CPU Ray actors, sized to what the cluster can place."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from genmodels.bulk.spec import JobCancelled, JobSpec
from genmodels.bulk.writer import ShardWriter
from genmodels.storage import Storage

#: How long the cluster gets to place a pool of writers before a job asks for fewer.
PLACEMENT_TIMEOUT_S = 5.0
#: Times a shard is handed to a writer whose actor then died, before the job fails.
SHARD_ATTEMPTS = 3
#: How often a job on Ray wakes to check ``should_stop`` while shards are being written.
_POLL_S = 0.25


def _place_writers(ray, wanted: int, should_stop: Callable[[], bool] | None):
    """A placement group of ``count`` one-CPU bundles, ``count <= wanted``, that the cluster
    placed within :data:`PLACEMENT_TIMEOUT_S`; ``(None, 0)`` when not even one fits.

    An actor asking for a CPU the cluster does not have stays pending forever (and work handed
    to it with it): asking first is what keeps a job on a busy cluster from hanging. The free
    CPUs are a hint, stale both ways: another job may take them meanwhile, and CPUs a job just
    released read as taken for a fraction of a second (a job submitted right after another
    ended would be written in-process). So at least one bundle is always asked for; the
    placement group's own wait is the answer."""
    from ray.util.placement_group import placement_group, remove_placement_group

    stopped = should_stop or (lambda: False)
    count = min(wanted, max(1, int(ray.available_resources().get("CPU", 0))))
    while count >= 1:
        if stopped():
            return None, 0
        group = placement_group([{"CPU": 1}] * count, strategy="PACK")
        ready = group.ready()
        # PLACEMENT_TIMEOUT_S in waits of _POLL_S: a job cancelled while its writers wait for CPUs
        # stops within one, not after the whole timeout. Not group.wait(): Ray 2.60 truncates its
        # timeout to whole seconds, so wait(0.25) returned at once and a job submitted as another
        # ended (its CPU not yet back) was written in-process without waiting at all.
        for _ in range(math.ceil(PLACEMENT_TIMEOUT_S / _POLL_S)):
            if ray.wait([ready], timeout=_POLL_S)[0]:
                return group, count
            if stopped():
                remove_placement_group(group)
                return None, 0
        remove_placement_group(group)
        count //= 2
    return None, 0


def run_on_ray(spec: JobSpec, sampler_files: Mapping[str, bytes], storage: Storage, num_shards: int,
                workers: int, finished: Callable[[int, dict[str, Any]], None],
                should_stop: Callable[[], bool] | None, on_event: Callable[[str, dict[str, Any]], None] | None,
                fallback: Callable[[], None]) -> None:
    """Shards on one-CPU actors, as many as the cluster can place (``fallback()`` writes them
    in-process when it can place none). A shard whose actor died (OOM killer, lost node, kill)
    is written again by a fresh actor, up to :data:`SHARD_ATTEMPTS` times: its bytes depend only
    on the job and the shard index, and its object and sidecar are each one atomic put, so a
    retry leaves exactly what an uninterrupted run would. ``should_stop`` is polled every
    :data:`_POLL_S` seconds; cancelling kills the actors (the shards they were writing are
    dropped, finished ones kept)."""
    from collections import Counter, deque

    import ray
    from ray.util.placement_group import remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from genmodels.ray_runtime import ensure_ray

    emit = on_event or (lambda event, detail: None)
    ensure_ray()
    group, count = _place_writers(ray, min(workers, num_shards), should_stop)
    emit("writers", {"count": count, "wanted": min(workers, num_shards)})
    if count == 0:
        if should_stop is not None and should_stop():
            raise JobCancelled(0, num_shards)
        return fallback()
    # One onnxruntime thread each: actors, not threads, give the parallelism.
    actor_cls = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(ShardWriter)
    files_ref = ray.put(dict(sampler_files))

    def start(bundle: int):
        strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle)
        return actor_cls.options(scheduling_strategy=strategy).remote(spec, files_ref, storage, 1)

    actors = {b: start(b) for b in range(count)}
    idle, todo = deque(range(count)), deque(range(num_shards))
    running: dict[Any, tuple[int, int]] = {}  # result ref -> (shard, bundle)
    attempts: Counter[int] = Counter()
    done = 0
    try:
        while todo or running:
            if should_stop is not None and should_stop():
                raise JobCancelled(done, num_shards)
            while idle and todo:
                bundle, k = idle.popleft(), todo.popleft()
                running[actors[bundle].write_indexed.remote(k)] = (k, bundle)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=_POLL_S)
            for ref in ready:
                k, bundle = running.pop(ref)
                try:
                    _, result = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    attempts[k] += 1
                    if attempts[k] >= SHARD_ATTEMPTS:
                        raise RuntimeError(f"shard {k}: its writer died {attempts[k]} times; giving up "
                                           f"(last: {type(exc).__name__})") from exc
                    emit("retry", {"shard": k, "attempt": attempts[k], "error": type(exc).__name__})
                    ray.kill(actors[bundle], no_restart=True)
                    actors[bundle] = start(bundle)  # its bundle is free again: the new actor fits
                    todo.appendleft(k)
                else:
                    finished(k, result)
                    done += 1
                idle.append(bundle)
    finally:
        # Kill, not drain: an interrupted shard is harmless (its object and sidecar are each
        # written atomically, the sidecar last) and a cancel should not wait for big shards.
        for actor in actors.values():
            ray.kill(actor, no_restart=True)
        remove_placement_group(group)

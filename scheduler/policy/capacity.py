"""The capacity index of one cycle: free GPUs now, GPUs held for reservations, and when the
running work is expected to release what it holds.

Nodes are grouped per site into a :class:`Pool` and bucketed by (node class, commitment
level, free GPUs), where a node class is a distinct (GPU model, memory) pair, so that
placing a gang costs about ``buckets x workers`` rather than ``nodes``. Everything here is
mutable state of ONE call to the policy and is thrown away when it returns.

Held GPUs: a reservation (or a preemption in flight) counts on some of the GPUs that are
free now; they leave the free buckets and are kept on their node with the time they are
needed from. Only a job expected to end by then may use them (backfill).

Release timeline: each running allocation releases its GPUs at its expected end (or, while
stopping, by its stop deadline). ``Pool.curve`` turns that into a step function "workers of
``g`` GPUs that fit at time t" that never decreases, so when a gang of ``n`` workers can
start is one binary search.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from scheduler.policy.types import NodeView

Prefs = tuple[int | None, ...]  # indexed by level rank: preference (0 best) or None
Plan = list[tuple[int, int]]  # (node_id, workers on it)
_BucketKey = tuple[int, int, int]  # (node class, level rank, free GPUs)
NEVER = 2**62


@dataclass(slots=True)
class Node:
    view: NodeView
    cls: int
    rank: int
    free: list[int]  # sorted ascending; shrinks as the cycle places gangs
    held: list[tuple[int, list[int]]] = field(default_factory=list)  # (needed from, GPU ids)

    def held_until(self, end_s: int) -> list[int]:
        """Held GPUs a job expected to end by ``end_s`` may borrow."""
        return [g for until, ids in self.held if until >= end_s for g in ids]


@dataclass(slots=True)
class Pool:
    """The nodes of one site, indexed so that a best-fit node is found without a scan.

    Invariant: a node with ``f > 0`` free GPUs appears in exactly one bucket,
    ``(cls, rank, f)``, whose node-id list is sorted; nodes with no free GPU are in none.
    ``version`` grows with every change, so caches keyed by it stay exact.
    """

    provider_id: int
    site_id: int
    site_name: str = ""
    nodes: dict[int, Node] = field(default_factory=dict)
    buckets: dict[_BucketKey, list[int]] = field(default_factory=dict)
    # (t, node, GPUs, allocation): running work's expected releases; sorted by the builder.
    releases: list[tuple[int, int, int, int]] = field(default_factory=list)
    dropped: set[int] = field(default_factory=set)  # allocations whose release is spoken for
    holders: set[int] = field(default_factory=set)  # nodes with held GPUs
    # node -> GPUs of its future releases that reservations already count on: the first
    # ones released there are theirs, and no later job's timeline sees them.
    consumed: dict[int, int] = field(default_factory=dict)
    version: int = 0
    _caps: dict[tuple[object, ...], tuple[int, int, int]] = field(default_factory=dict)
    _curves: dict[tuple[object, ...], tuple[int, list[int], list[int]]] = field(
        default_factory=dict
    )

    @property
    def key(self) -> tuple[int, int]:
        return (self.provider_id, self.site_id)

    def add(self, node: Node) -> None:
        self.nodes[node.view.node_id] = node
        self._insert(node)

    def _insert(self, node: Node) -> None:
        if node.free:
            ids = self.buckets.setdefault((node.cls, node.rank, len(node.free)), [])
            bisect.insort(ids, node.view.node_id)

    def _remove(self, node: Node) -> None:
        if not node.free:
            return
        key = (node.cls, node.rank, len(node.free))
        ids = self.buckets[key]
        del ids[bisect.bisect_left(ids, node.view.node_id)]
        if not ids:
            del self.buckets[key]

    # --- changes ---------------------------------------------------------------------------
    def take(self, node_id: int, count: int, extra: list[int] | None = None) -> list[int]:
        """Remove and return the ``count`` lowest GPU ids among the node's free GPUs and
        ``extra`` (held GPUs a short job borrows); borrowed GPUs leave their hold."""
        node = self.nodes[node_id]
        avail = sorted([*node.free, *extra]) if extra else node.free
        chosen = avail[:count]
        used = set(chosen)
        self._remove(node)
        node.free = [gpu for gpu in node.free if gpu not in used]
        self._insert(node)
        if extra:
            node.held = [(t, [g for g in ids if g not in used]) for t, ids in node.held]
            node.held = [(t, ids) for t, ids in node.held if ids]
        self.version += 1
        return chosen

    def hold(self, node_id: int, count: int, until_s: int) -> None:
        """Move ``count`` free GPUs of the node (the highest ids) into a hold until ``until_s``."""
        node = self.nodes[node_id]
        count = min(count, len(node.free))
        if count <= 0:
            return
        self._remove(node)
        ids = node.free[-count:]
        node.free = node.free[:-count]
        self._insert(node)
        node.held.append((until_s, ids))
        self.holders.add(node_id)
        self.version += 1

    def consume(self, node_id: int, count: int) -> None:
        """A reservation counts on ``count`` GPUs the node's running work will release."""
        if count > 0:
            self.consumed[node_id] = self.consumed.get(node_id, 0) + count
            self.version += 1

    def drop_release(self, allocation_id: int) -> None:
        """The allocation's GPUs are spoken for (a preemption's victim): not in the timeline."""
        self.dropped.add(allocation_id)
        self.version += 1

    # --- capacity now ----------------------------------------------------------------------
    def free_capacity(self, classes: frozenset[int], gpus: int, prefs: Prefs) -> tuple[int, int]:
        """(workers of ``gpus`` GPUs that fit on free GPUs, free GPUs) on usable nodes."""
        key = (classes, gpus, prefs)
        cached = self._caps.get(key)
        if cached is not None and cached[0] == self.version:
            return cached[1], cached[2]
        workers = free = 0
        for (cls, rank, f), ids in self.buckets.items():
            if cls in classes and prefs[rank] is not None:
                workers += len(ids) * (f // gpus)
                free += len(ids) * f
        self._caps[key] = (self.version, workers, free)
        return workers, free

    def static_capacity(
        self, classes: frozenset[int], gpus: int, prefs: Prefs | None = None
    ) -> tuple[int, int, int]:
        """(workers that fit on an empty site, matching GPUs, largest matching node); it
        does not change within a cycle, so it is computed once per key."""
        key = ("static", classes, gpus, prefs)
        cached = self._caps.get(key)
        if cached is None:
            workers = total = largest = 0
            for node in self.nodes.values():
                if node.cls in classes and (prefs is None or prefs[node.rank] is not None):
                    size = node.view.total_gpus
                    workers += size // gpus
                    total += size
                    largest = max(largest, size)
            cached = self._caps[key] = (workers, total, largest)
        return cached

    def plan(
        self,
        classes: frozenset[int],
        gpus: int,
        workers: int,
        prefs: Prefs,
        overrides: dict[int, int] | None = None,
    ) -> Plan | None:
        """Greedy best-fit plan: a list of (node_id, workers on it), or None if it does not fit.

        ``overrides`` gives the GPU count of nodes whose count differs from their free count
        (victims' or borrowed GPUs added); such nodes are ignored in the buckets. Each step
        picks the node minimising (level preference, GPUs left after placing as many
        workers as it can take, node id) and fills it; a filled node can take no further
        worker, so each node is picked at most once and the plan has at most ``workers``
        steps.
        """
        picked: dict[int, int] = {}
        remaining = workers
        while remaining:
            best: tuple[int, int, int] | None = None
            best_k = 0
            for (cls, rank, f), ids in self.buckets.items():
                pref = prefs[rank]
                if f < gpus or pref is None or cls not in classes:
                    continue
                k = min(f // gpus, remaining)
                key_head = (pref, f - k * gpus)
                if best is not None and key_head > best[:2]:
                    continue
                for node_id in ids:
                    if node_id not in picked and (overrides is None or node_id not in overrides):
                        break
                else:
                    continue
                key = (*key_head, node_id)
                if best is None or key < best:
                    best, best_k = key, k
            if overrides:
                for node_id, f in overrides.items():
                    node = self.nodes[node_id]
                    pref = prefs[node.rank]
                    if f < gpus or node_id in picked or pref is None or node.cls not in classes:
                        continue
                    k = min(f // gpus, remaining)
                    key = (pref, f - k * gpus, node_id)
                    if best is None or key < best:
                        best, best_k = key, k
            if best is None:
                return None
            picked[best[2]] = best_k
            remaining -= best_k
        return list(picked.items())

    def score(
        self, plan: Plan, gpus: int, prefs: Prefs, overrides: dict[int, int] | None = None
    ) -> tuple[int, int, int]:
        """(worst level preference, GPU-weighted preference, GPUs left free on the nodes
        used): lower is better."""
        worst = weighted = left = 0
        for node_id, k in plan:
            node = self.nodes[node_id]
            free = overrides.get(node_id, len(node.free)) if overrides else len(node.free)
            pref = prefs[node.rank] or 0
            worst = max(worst, pref)
            weighted += pref * k * gpus
            left += free - k * gpus
        return worst, weighted, left

    def borrowable(self, classes: frozenset[int], prefs: Prefs, end_s: int) -> dict[int, int]:
        """Free + borrowable held GPUs of usable nodes that hold any, for a job ending by
        ``end_s`` (the overrides for :meth:`plan`)."""
        out: dict[int, int] = {}
        for node_id in self.holders:
            node = self.nodes[node_id]
            if node.cls in classes and prefs[node.rank] is not None:
                extra = len(node.held_until(end_s))
                if extra:
                    out[node_id] = len(node.free) + extra
        return out

    # --- capacity over time ----------------------------------------------------------------
    def curve(
        self, classes: frozenset[int], gpus: int, prefs: Prefs, now_s: int
    ) -> tuple[list[int], list[int]]:
        """(times, workers): from ``times[i]`` on, ``workers[i]`` workers of ``gpus`` GPUs fit
        on usable nodes, counting free GPUs and the releases of running work, and never the
        GPUs held or placed this cycle. ``workers`` never decreases."""
        key = (classes, gpus, prefs)
        cached = self._curves.get(key)
        if cached is not None and cached[0] == self.version:
            return cached[1], cached[2]
        usable = {
            nid: n
            for nid, n in self.nodes.items()
            if n.cls in classes and prefs[n.rank] is not None
        }
        avail = {nid: len(n.free) for nid, n in usable.items()}
        w = sum(a // gpus for a in avail.values())
        times, counts = [now_s], [w]
        skip = dict(self.consumed)
        for t, node_id, n, alloc in self.releases:
            if node_id not in avail or alloc in self.dropped:
                continue
            if skip.get(node_id):
                used = min(n, skip[node_id])
                skip[node_id] -= used
                n -= used
                if not n:
                    continue
            before = avail[node_id]
            after = before + n
            avail[node_id] = after
            w += after // gpus - before // gpus
            if t <= times[-1]:
                counts[-1] = w
            else:
                times.append(t)
                counts.append(w)
        self._curves[key] = (self.version, times, counts)
        return times, counts

    def earliest(
        self, classes: frozenset[int], gpus: int, workers: int, prefs: Prefs, now_s: int
    ) -> int | None:
        """When ``workers`` workers of ``gpus`` GPUs first fit here (None: never, on what is
        known now)."""
        times, counts = self.curve(classes, gpus, prefs, now_s)
        i = bisect.bisect_left(counts, workers)
        return times[i] if i < len(times) else None

    def available_at(
        self, classes: frozenset[int], prefs: Prefs, t: int
    ) -> tuple[dict[int, int], dict[int, int]]:
        """Per usable node: (GPUs available at ``t``, of which released by running work)."""
        avail: dict[int, int] = {}
        released: dict[int, int] = {}
        for nid, node in self.nodes.items():
            if node.cls in classes and prefs[node.rank] is not None:
                avail[nid] = len(node.free)
        skip = dict(self.consumed)
        for when, node_id, n, alloc in self.releases:
            if when > t:
                break
            if node_id in avail and alloc not in self.dropped:
                used = min(n, skip.get(node_id, 0))
                if used:
                    skip[node_id] -= used
                    n -= used
                avail[node_id] += n
                released[node_id] = released.get(node_id, 0) + n
        return avail, released

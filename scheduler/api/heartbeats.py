"""Heartbeats at fleet scale: checked in memory, committed in groups, samples flushed.

Twenty thousand nodes of 8 GPUs reporting every 4 s is 5,000 heartbeats and 40,000 GPU
samples a second. The design (docs/ARCHITECTURE.md, "Heartbeats at fleet scale"):

- **What is checked in memory.** Each server process keeps a directory of the nodes (id,
  provider, site, GPU UUIDs and the health last written), loaded at start and re-read
  every ``directory_refresh_s``; a node it does not know is read on first use, and a
  heartbeat it would refuse (an unknown GPU, another site's token) is checked again
  against a fresh read before it is refused. Tokens are cached ``auth_cache_s`` (one
  database check at a time per token, however many requests wait for it).
- **What is durable before the 200.** Every heartbeat is queued; a writer thread takes
  whatever is queued (up to ``max_batch``; it waits ``max_wait_s`` at most for more once
  one arrived) and commits the whole batch in **one transaction of a fixed number of
  statements** (scheduler/services/liveness.py): the nodes' liveness (last heartbeat,
  skew, NVML error, a lost node back to ready) in one statement that also returns their
  status; the GPUs whose health changed; the evidence windows; the held GPUs for the busy
  flags. A request is answered only after its batch committed: a 200 means its liveness
  and its evidence are stored (the agent then deletes that evidence from its spool), so a
  crash loses no acknowledged heartbeat, the lost-node rule sees exactly what was
  acknowledged, and the ledger, metered to the last stored heartbeat, loses no GPU-second.
- **What is not.** The GPUs' metrics (utilisation, memory, power, energy, temperature,
  processes, throttle reasons) are kept in memory, newest per GPU, and written every
  ``sample_flush_s``, 2,000 GPUs per transaction: they inform people, not the ledger
  (which is metered from allocations and evidence) nor the scheduler (which reads health).
  A crash loses at most that many seconds of them; this process's API shows the newest.
- **The answer** (``HeartbeatAck``) is what the agent acts on: status, who set it, the
  node's busy GPUs, the skew; not the node's whole view.

A refused heartbeat (an unknown node, another provider's token, a GPU the node does not
have, a retired node) gets its own 4xx and does not fail its batch; a batch that fails as
a whole (the database went away) fails each of its requests with a 503 and the agents
retry. Batches are written one at a time: on SQLite (one writer) heartbeats never contend
with each other, and with several replicas on PostgreSQL each batches its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from scheduler.api.errors import domain_error
from scheduler.db.engine import session_scope
from scheduler.db.types import utcnow
from scheduler.domain.enums import GpuHealth
from scheduler.domain.periods import Grain
from scheduler.errors import (
    AndromedaError,
    Conflict,
    Forbidden,
    NotFound,
    Unauthenticated,
    Unavailable,
    ValidationFailed,
)
from scheduler.schemas import (
    GpuPublic,
    Heartbeat,
    HeartbeatAck,
    NodeHeartbeatAnswer,
    NodePublic,
    SiteHeartbeats,
    SiteHeartbeatsAck,
)
from scheduler.services.evidence import store_evidence_many
from scheduler.services.liveness import (
    GpuHealthRow,
    GpuSampleRow,
    Liveness,
    NodeRef,
    load_refs,
    record_liveness,
    write_gpu_health,
    write_gpu_samples,
)
from scheduler.services.nodes import SKEW_WARN_MS
from scheduler.services.tokens import Principal, authenticate, hash_token

log = logging.getLogger(__name__)

SAMPLE_CHUNK = 2_000  # GPU samples per flush transaction

_RETRYABLE = {"40P01", "40001"}  # deadlock detected, serialization failure: write it again

T = TypeVar("T")


@dataclass(slots=True)
class _Pending:
    ref: NodeRef
    liveness: Liveness
    health: list[GpuHealthRow]
    evidence: Heartbeat
    future: asyncio.Future[HeartbeatAck]
    loop: asyncio.AbstractEventLoop


@dataclass(slots=True)
class BatchStats:
    """What the writer did, for benchmarks and introspection."""

    batches: int = 0
    heartbeats: int = 0
    largest: int = 0
    failed_batches: int = 0
    write_s: float = 0.0
    sample_flushes: int = 0
    samples_written: int = 0
    sample_flush_s: float = 0.0
    directory_loads: int = 0
    sizes: list[int] = field(default_factory=list)


class HeartbeatBatcher:
    """Checks heartbeats in memory, commits them in batches, flushes GPU samples."""

    def __init__(
        self,
        engine: Engine,
        *,
        grain: Grain,
        max_batch: int = 1000,
        max_wait_s: float = 0.005,
        auth_cache_s: float = 10.0,
        sample_flush_s: float = 30.0,
        directory_refresh_s: float = 60.0,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.engine = engine
        self.grain = grain
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.auth_cache_s = auth_cache_s
        self.sample_flush_s = sample_flush_s
        self.directory_refresh_s = directory_refresh_s
        self.clock = clock
        self.stats = BatchStats()
        self._queue: list[_Pending] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._tokens: dict[str, tuple[float, Principal]] = {}
        self._refs: dict[str, NodeRef] = {}
        self._inflight: dict[str, asyncio.Future[object]] = {}
        self._wanted: dict[str, asyncio.Future[NodeRef | None]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._samples: dict[int, GpuSampleRow] = {}  # newest per GPU, not yet written
        self._flushing: dict[int, GpuSampleRow] = {}  # being written now
        self._flush_lock = threading.Lock()
        self._next_flush = time.monotonic() + sample_flush_s
        self._next_refresh = time.monotonic() + directory_refresh_s

    # --- the request side (event loop) ------------------------------------------------------
    async def principal(self, secret: str | None) -> Principal:
        """The token's principal, from the cache or (on a miss) the database."""
        if not secret:
            raise Unauthenticated("missing bearer token (Authorization: Bearer <token>)")
        key = hash_token(secret)
        hit = self._tokens.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        principal = await self._once(f"token:{key}", lambda: self._authenticate(secret))
        if len(self._tokens) > 10_000:
            self._tokens.clear()
        self._tokens[key] = (time.monotonic() + self.auth_cache_s, principal)
        return principal

    def _authenticate(self, secret: str) -> Principal:
        with session_scope(self.engine) as session:
            return authenticate(session, secret=secret)

    async def _once(self, key: str, work: Callable[[], T]) -> T:
        """``work`` in a thread, once at a time per ``key``: concurrent callers share it."""
        waiting = self._inflight.get(key)
        if waiting is not None:
            return await asyncio.shield(waiting)  # type: ignore[arg-type]
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await asyncio.to_thread(work)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning without waiters
            raise
        else:
            future.set_result(result)
            return result
        finally:
            del self._inflight[key]

    async def _ref(self, name: str, *, fresh: bool = False) -> NodeRef:
        ref = None if fresh else self._refs.get(name)
        if ref is not None:
            return ref
        # Nodes not in the directory are read together: after a restart, or when a fleet
        # registers, thousands arrive in the same second.
        wanted = self._wanted.get(name)
        if wanted is None:
            wanted = self._wanted[name] = asyncio.get_running_loop().create_future()
            if self._reader is None or self._reader.done():
                self._reader = asyncio.create_task(self._read_wanted())
        ref = await asyncio.shield(wanted)
        if ref is None:
            raise NotFound(f"node {name!r} not found")
        return ref

    async def _read_wanted(self) -> None:
        while self._wanted:
            await asyncio.sleep(0)  # let the requests of this moment join
            wanted, self._wanted = self._wanted, {}
            try:
                loaded = await asyncio.to_thread(self._load, list(wanted))
            except Exception as exc:
                for future in wanted.values():
                    future.set_exception(Unavailable(f"nodes could not be read ({exc}): retry"))
                    future.exception()
                continue
            for name, future in wanted.items():
                future.set_result(loaded.get(name))

    def _load(self, names: list[str] | None) -> dict[str, NodeRef]:
        with session_scope(self.engine) as session:
            refs = load_refs(session, names=names)
        self.stats.directory_loads += 1
        self._refs.update(refs)
        return refs

    def queued(self) -> int:
        """Heartbeats waiting for the writer."""
        return len(self._queue)

    def nodes_known(self) -> int:
        return len(self._refs)

    def forget(self, name: str) -> None:
        """Read ``name`` afresh on its next heartbeat (its registration changed it)."""
        self._refs.pop(name, None)

    async def submit(self, name: str, principal: Principal, body: Heartbeat) -> HeartbeatAck:
        """Check one heartbeat, queue it; its answer once the batch it joined committed."""
        return await self._submit(name, principal, body, site=None)

    async def submit_site(
        self, site: str, principal: Principal, body: SiteHeartbeats
    ) -> SiteHeartbeatsAck:
        """A site's batch: each node's heartbeat checked, recorded and answered as if it
        had come alone (one refused does not refuse the others)."""
        answers = await asyncio.gather(
            *(self._submit(n.name, principal, n.heartbeat, site=site) for n in body.nodes),
            return_exceptions=True,
        )
        out = []
        for n, answer in zip(body.nodes, answers, strict=True):
            if isinstance(answer, HeartbeatAck):
                out.append(NodeHeartbeatAnswer(name=n.name, status_code=200, ack=answer))
            elif isinstance(answer, AndromedaError):
                status, content, _ = domain_error(answer)
                out.append(
                    NodeHeartbeatAnswer(name=n.name, status_code=status, detail=content["detail"])
                )
            else:
                raise answer
        return SiteHeartbeatsAck(nodes=out)

    async def _submit(
        self, name: str, principal: Principal, body: Heartbeat, *, site: str | None
    ) -> HeartbeatAck:
        received_at = self.clock()
        ref = await self._ref(name)
        try:
            _check(ref, principal, body, site)
        except AndromedaError:
            ref = await self._ref(name, fresh=True)  # refuse only against a fresh read
            _check(ref, principal, body, site)
        health = self._observe(ref, body, received_at)
        skew = None
        if body.sent_at is not None:
            # Against when the request arrived, not when its batch is written: time queued
            # in the server is not the agent's clock being off.
            skew = int((body.sent_at - received_at).total_seconds() * 1000)
            if abs(skew) > SKEW_WARN_MS and (
                ref.clock_skew_ms is None or abs(ref.clock_skew_ms) <= SKEW_WARN_MS
            ):
                log.warning("node %s: its clock is %+.1f s off the server's", name, skew / 1000)
            ref.clock_skew_ms = skew
        loop = asyncio.get_running_loop()
        future: asyncio.Future[HeartbeatAck] = loop.create_future()
        pending = _Pending(
            ref, Liveness(ref.id, skew, body.gpu_source_error), health, body, future, loop
        )
        with self._cond:
            if self._stopping:
                raise Unavailable("the server is shutting down: retry against another replica")
            self._queue.append(pending)
            self._cond.notify()
        return await future

    def _observe(self, ref: NodeRef, body: Heartbeat, at: datetime) -> list[GpuHealthRow]:
        """Keep the newest samples; the GPUs whose health changed (to be written with the
        batch). A node whose NVML broke has its GPUs unknown with the cause (a known
        failure stays known) until NVML answers again."""
        health: dict[int, tuple[GpuHealth, str | None]] = {}
        for s in body.gpus:
            gpu = ref.gpus[s.uuid]
            health[gpu.id] = (s.health, "; ".join(s.health_reasons)[:1000] or None)
            self._samples[gpu.id] = GpuSampleRow(
                gpu.id,
                s.utilization_pct,
                s.memory_used_bytes,
                s.temperature_c,
                s.power_mw,
                s.energy_mj,
                s.process_count,
                None if s.throttle_reasons is None else ",".join(s.throttle_reasons)[:500],
                at,
            )
        error = body.gpu_source_error
        if error:
            if ref.gpu_source_error != error:
                log.warning("node %s: NVML is broken: %s", ref.name, error)
            cause = f"NVML broken on the node: {error}"[:1000]
            for gpu in ref.gpus.values():
                now = health.get(gpu.id, (gpu.health, gpu.reasons))[0]
                if now != GpuHealth.failed:
                    health[gpu.id] = (GpuHealth.unknown, cause)
        elif ref.gpu_source_error:
            log.info("node %s: NVML answers again", ref.name)
        ref.gpu_source_error = error
        changed = []
        for gpu in ref.gpus.values():
            new = health.get(gpu.id)
            if new is not None and new != (gpu.health, gpu.reasons):
                gpu.health, gpu.reasons = new
                changed.append(GpuHealthRow(gpu.id, *new))
        return changed

    def overlay(self, node: NodePublic) -> NodePublic:
        """``node`` with the newest samples this process holds and has not written yet."""
        ref = self._refs.get(node.name)
        if ref is None:
            return node
        gpus: list[GpuPublic] = []
        for g in node.gpus:
            known = ref.gpus.get(g.uuid)
            s = None
            if known is not None:
                s = self._samples.get(known.id) or self._flushing.get(known.id)
            gpus.append(
                g
                if s is None
                else g.model_copy(
                    update={"utilization_pct": s.utilization_pct, "process_count": s.process_count}
                )
            )
        return node.model_copy(update={"gpus": gpus})

    # --- the writer thread ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="heartbeat-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Write what is queued and the samples held, then stop."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _take(self) -> list[_Pending]:
        with self._cond:
            while not self._queue and not self._stopping:
                left = min(self._next_flush, self._next_refresh) - time.monotonic()
                if left <= 0:
                    return []
                self._cond.wait(left)
            if not self._queue:
                return []
            # Once one heartbeat is here, give the others a moment to join its batch.
            deadline = time.monotonic() + self.max_wait_s
            while len(self._queue) < self.max_batch and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            return batch

    def _take_queued(self) -> list[_Pending]:
        """What is queued now, without waiting (at most ``max_batch``)."""
        with self._cond:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            return batch

    def _run(self) -> None:
        try:
            self._load(None)
        except Exception as exc:  # nodes are then read as their heartbeats come
            log.warning("could not preload the node directory: %s", exc)
        while True:
            batch = self._take()
            if batch:
                self._write(batch)
            now = time.monotonic()
            if now >= self._next_flush or (self._stopping and not self._queue):
                self.flush_samples()
            if now >= self._next_refresh:
                self._refresh()
            if self._stopping and not self._queue:
                return

    def _refresh(self) -> None:
        """Re-read the whole directory: what another replica or an admin changed (a GPU's
        health written elsewhere, a node moved) is seen within ``directory_refresh_s``."""
        self._next_refresh = time.monotonic() + self.directory_refresh_s
        try:
            self._load(None)
        except Exception as exc:
            log.warning("could not refresh the node directory: %s", exc)

    def flush_samples(self) -> int:
        """Write the newest sample of every GPU heard since the last flush; how many."""
        with self._flush_lock:
            return self._flush_samples()

    def _flush_samples(self) -> int:
        self._next_flush = time.monotonic() + self.sample_flush_s
        self._flushing, self._samples = self._samples, {}
        if not self._flushing:
            return 0
        started = time.perf_counter()
        # In GPU order (replicas flushing the same GPUs lock them in the same order), in
        # short transactions of a few thousand rows, and with the heartbeats that arrive
        # meanwhile written between them: a fleet's flush never holds up its heartbeats.
        rows = sorted(self._flushing.values(), key=lambda r: r.gpu_id)
        written = 0
        for i in range(0, len(rows), SAMPLE_CHUNK):
            part = rows[i : i + SAMPLE_CHUNK]
            try:
                with session_scope(self.engine) as session:
                    written += write_gpu_samples(session, part)
            except Exception as exc:  # kept for the next flush, unless newer ones came
                log.warning("GPU samples not written (%s): kept for the next flush", exc)
                for row in part:
                    self._samples.setdefault(row.gpu_id, row)
            if self._thread is threading.current_thread():
                waiting = self._take_queued()
                if waiting:
                    self._write(waiting)
        self._flushing = {}
        self.stats.sample_flushes += 1
        self.stats.samples_written += written
        self.stats.sample_flush_s += time.perf_counter() - started
        return written

    def _write(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        try:
            try:
                answers = self._record(batch)
            except DBAPIError as exc:
                if getattr(exc.orig, "sqlstate", None) not in _RETRYABLE:
                    raise
                log.info("a batch of %d heartbeats met %s: once more", len(batch), exc.orig)
                answers = self._record(batch)
        except Exception as exc:  # the batch as a whole: each request gets a 503
            log.warning("a batch of %d heartbeats could not be written: %s", len(batch), exc)
            self.stats.failed_batches += 1
            for p in batch:  # the health they would have written is read afresh
                self._refs.pop(p.ref.name, None)
            error = Unavailable(f"heartbeat not recorded ({type(exc).__name__}): retry")
            answers = [error] * len(batch)
        self.stats.batches += 1
        self.stats.heartbeats += len(batch)
        self.stats.largest = max(self.stats.largest, len(batch))
        self.stats.write_s += time.perf_counter() - started
        # One wake-up of each event loop per batch, not one per heartbeat.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[HeartbeatAck], Any]]]
        by_loop = {}
        for pending, answer in zip(batch, answers, strict=True):
            by_loop.setdefault(pending.loop, []).append((pending.future, answer))
        for loop, settled in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop closed: nobody waits
                loop.call_soon_threadsafe(_settle_all, settled)

    def _record(self, batch: list[_Pending]) -> list[HeartbeatAck | AndromedaError]:
        now = self.clock()
        with session_scope(self.engine) as session:
            states = record_liveness(session, [p.liveness for p in batch], now=now)
            live = [p for p in batch if p.ref.id in states]
            write_gpu_health(session, [h for p in live for h in p.health])
            with_evidence = [p for p in live if p.evidence.evidence]
            acks = (
                store_evidence_many(
                    session,
                    [(p.ref.id, p.evidence.evidence) for p in with_evidence],
                    now=now,
                    grain=self.grain,
                )
                if with_evidence
                else []
            )
            stored = {id(p): a.stored for p, a in zip(with_evidence, acks, strict=True)}
        answers: list[HeartbeatAck | AndromedaError] = []
        for p in batch:
            state = states.get(p.ref.id)
            if state is None:
                answers.append(Conflict(f"node {p.ref.name!r} was retired: stop its agent"))
                continue
            if state.was_lost:
                log.info("node %s is back after being lost", p.ref.name)
            answers.append(
                HeartbeatAck(
                    name=p.ref.name,
                    status=state.status,
                    status_reason=state.status_reason,
                    status_set_by=state.status_set_by,
                    busy=sorted(p.ref.uuids[g] for g in state.held if g in p.ref.uuids),
                    clock_skew_ms=state.clock_skew_ms,
                    evidence_stored=stored.get(id(p), 0),
                )
            )
        return answers


def _check(ref: NodeRef, principal: Principal, body: Heartbeat, site: str | None) -> None:
    """Refuse a heartbeat before anything of it is written: another provider's or site's
    token (403), a node of another site than its batch's (403), GPUs (in samples or
    evidence) the node has not registered (422)."""
    principal.require_node_of(ref.provider_id, ref.site_id, ref.name)
    if site is not None and ref.site != site:
        raise Forbidden(f"node {ref.name!r} is of site {ref.site!r}, not {site!r}")
    unknown = [s.uuid for s in body.gpus if s.uuid not in ref.gpus]
    if unknown:
        raise ValidationFailed("gpus", f"GPUs not registered on this node: {', '.join(unknown)}")
    strangers = sorted({w.uuid for w in body.evidence if w.uuid not in ref.gpus})
    if strangers:
        raise ValidationFailed(
            "evidence", f"GPUs not registered on this node: {', '.join(strangers)}"
        )


def _settle_all(settled: list[tuple[asyncio.Future[HeartbeatAck], Any]]) -> None:
    for future, answer in settled:
        if future.done():  # the client went away
            continue
        if isinstance(answer, AndromedaError):
            future.set_exception(answer)
        else:
            future.set_result(answer)

"""The fleet's summary a server process keeps for the submit-time check (services/fleet.py):
submissions do not count the fleet again while it is recent; a node that registered after it
was computed (in another server process: another engine on the same database) never causes
a wrong refusal, because a refusal is confirmed against a summary computed after the
submission arrived; a change this process commits is seen by the next submission."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import select

from scheduler.db.engine import make_engine, session_scope
from scheduler.db.models import Gpu
from scheduler.domain.enums import CommitmentLevel
from scheduler.domain.jobspec import JobSpec
from scheduler.errors import ValidationFailed
from scheduler.services import fleet
from scheduler.services.jobs import submit_job
from tests import factories as f

T0 = datetime(2026, 11, 1, 12, 0, 0, tzinfo=UTC)


def spec(workers: int = 1, per_worker: int = 1, model: str | None = "H100") -> JobSpec:
    return JobSpec(
        name="train",
        model="m1:v1",
        entrypoint="true",
        workers=workers,
        gpus_per_worker=per_worker,
        gpu={"model": model},  # type: ignore[arg-type]
    )


@pytest.fixture
def kept(engine: Engine, session_of, monkeypatch: pytest.MonkeyPatch) -> fleet.FleetCache:  # type: ignore[no-untyped-def]
    """A fleet of one 4 x H100 node; this process's summary of it kept for an hour (so
    only a change, or a refusal, computes it again)."""
    with session_of() as s:
        orion = f.provider(s, "orion", CommitmentLevel.reserved)
        f.node(s, orion, "e1", gpus=4, now=T0)
        f.ensure_model_version(s, "m1:v1")
    cache = fleet.cache_of(engine)
    monkeypatch.setattr(cache, "max_age_s", 3600.0)
    with session_of() as s:
        submit_job(s, spec=spec(), owner="tester", now=T0)
    return cache


def test_submissions_use_the_kept_summary(kept, session_of) -> None:  # type: ignore[no-untyped-def]
    before = kept.refreshes
    for _ in range(5):
        with session_of() as s:
            submit_job(s, spec=spec(per_worker=4), owner="tester", now=T0)
    assert kept.refreshes == before


def test_a_node_registered_elsewhere_after_the_summary_is_not_refused_against_it(  # type: ignore[no-untyped-def]
    kept, db_url, session_of
) -> None:
    other = make_engine(db_url)  # another server process on the same database
    try:
        with session_scope(other) as s:
            orion = f.provider(s, "orion-2", CommitmentLevel.reserved)
            f.node(s, orion, "h1", gpus=8, kind=f.H200, now=T0)
    finally:
        other.dispose()
    with session_of() as s:
        assert kept.get(s).models == ("H100-80GB",)  # the kept summary has not seen h1
        before = kept.refreshes
        submit_job(s, spec=spec(per_worker=8, model="H200"), owner="tester", now=T0)
    assert kept.refreshes == before + 1  # refused on the kept summary, so confirmed
    with session_of() as s:  # the fresh summary is kept: the next one needs no refresh
        submit_job(s, spec=spec(per_worker=8, model="H200"), owner="tester", now=T0)
    assert kept.refreshes == before + 1
    # and what no node can host is still refused, with the usual messages
    refused = [
        (spec(model="B200"), "gpu.model", "no node of the fleet has ever had B200 GPUs (the "
         "fleet has H100-80GB, H200-141GB); submit with --allow-unknown-model"),
        (spec(per_worker=16, model=None), "gpus_per_worker",
         "16 GPUs per worker, but the largest node has 8"),
        (spec(workers=2, per_worker=8, model="H200"), "workers",
         "2 workers x 8 GPUs, but the largest site can hold 1 such workers"),
    ]  # fmt: skip
    for job, field, message in refused:
        with session_of() as s, pytest.raises(ValidationFailed) as caught:
            submit_job(s, spec=job, owner="tester", now=T0)
        assert caught.value.field == field and message in caught.value.detail, caught.value


def test_a_change_committed_here_is_seen_by_the_next_submission(kept, session_of) -> None:  # type: ignore[no-untyped-def]
    """e1's GPUs turn out to be H200s: an H100 job is refused at once, not accepted on
    the kept summary."""
    with session_of() as s:
        orion = f.provider(s, "orion-2", CommitmentLevel.reserved)
        f.node(s, orion, "e1-again", gpus=4, kind=f.H200, now=T0)  # a new node: seen
    with session_of() as s:
        assert kept.get(s).models == ("H100-80GB", "H200-141GB")
    with session_of() as s:
        for gpu in s.exec(select(Gpu).where(Gpu.model == "H100-80GB")):
            gpu.model = "H200-141GB"
            s.add(gpu)
    with session_of() as s, pytest.raises(ValidationFailed) as caught:
        submit_job(s, spec=spec(), owner="tester", now=T0)
    assert "no node of the fleet has ever had H100 GPUs (the fleet has H200-141GB)" in (
        caught.value.detail
    )


def test_a_session_checks_against_its_own_uncommitted_nodes(kept, session_of) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:
        orion = f.provider(s, "orion-2", CommitmentLevel.reserved)
        f.node(s, orion, "h1", gpus=8, kind=f.H200, now=T0)
        submit_job(s, spec=spec(per_worker=8, model="H200"), owner="tester", now=T0)
        assert kept.get(s).models == ("H100-80GB",)  # its view was not kept ...
    with session_of() as s:
        assert kept.get(s).models == ("H100-80GB", "H200-141GB")  # ... but its commit counts


class _Session:
    """Enough of a session for the cache with a fake query."""

    def get_bind(self) -> SimpleNamespace:
        return SimpleNamespace(dialect=SimpleNamespace(name="postgresql"))


def test_a_summary_too_old_is_computed_again_by_one_caller_while_the_others_wait() -> None:
    now = [100.0]
    calls: list[int] = []
    gate = threading.Event()

    def query(_session: object) -> tuple[fleet.Row, ...]:
        calls.append(1)
        gate.wait(5)
        return ((1, "H100-80GB", 80, 8, len(calls)),)

    cache = fleet.FleetCache(max_age_s=5.0, clock=lambda: now[0], query=query)
    gate.set()
    first = cache.get(_Session())  # type: ignore[arg-type]
    assert cache.get(_Session()) is first and len(calls) == 1  # type: ignore[arg-type]
    now[0] += 5.0
    gate.clear()
    got: list[fleet.FleetSummary] = []
    threads = [
        threading.Thread(target=lambda: got.append(cache.get(_Session())))  # type: ignore[arg-type]
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join(10)
    assert len(calls) == 2 and len(got) == 8 and all(g is got[0] for g in got)
    assert got[0].rows[0][4] == 2
    # asked for a summary begun after a mark, the cache computes one even though it is recent
    mark = cache.mark()
    assert cache.get(_Session(), after=mark).serial > mark and len(calls) == 3  # type: ignore[arg-type]

"""The schema comes from migrations, and the migrations match the models, on both databases."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlmodel import SQLModel

import scheduler.db.models  # noqa: F401
from scheduler.db.migrate import current_revision, head_revision, upgrade


def test_the_migrated_schema_matches_the_models(engine, db_url) -> None:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert diff == [], f"models and migrations differ; add a migration: {diff}"


def test_upgrading_an_up_to_date_database_is_a_no_op(engine, db_url) -> None:  # type: ignore[no-untyped-def]
    before = current_revision(engine)
    assert before == head_revision(db_url) and before is not None
    upgrade(db_url)
    assert current_revision(engine) == before


def test_the_seeded_reward_policy_is_the_default_one_in_code(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from sqlmodel import Session, select

    from scheduler.attribution.policy import DEFAULT_POLICY
    from scheduler.db.engine import make_engine
    from scheduler.db.models import RewardPolicy

    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    upgrade(url)
    engine = make_engine(url)
    with Session(engine) as s:
        (row,) = s.exec(select(RewardPolicy)).all()
        seeded = {k: getattr(row, k) for k in DEFAULT_POLICY.row()}
    engine.dispose()
    assert seeded == DEFAULT_POLICY.row()

"""Transactional enqueue: a job sent inside the caller's transaction lives or dies with it."""

from __future__ import annotations

import jobs_project
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from heretic_kombu import states


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "test_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer: Mapped[str]


@pytest.fixture
def user_engine(app, backend):
    """The application's own engine on the same database as the job table."""
    url = backend.database_url.replace("postgresql://", "postgresql+psycopg2://")
    engine = sa.create_engine(url)
    Base.metadata.create_all(engine)
    yield engine
    Base.metadata.drop_all(engine)
    engine.dispose()


def test_jobs_sent_in_a_session_are_published_only_after_commit(
    app, backend, user_engine, start_worker
):
    start_worker()
    with Session(user_engine) as session:
        with app.transaction(session):
            session.add(Order(customer="acme"))
            session.flush()
            result = jobs_project.add.delay(1, 2)
        # Not committed yet: another connection sees no job, the broker holds no message.
        assert app.store.get(result.id) is None
        assert app.broker.queue_size(backend.queue) == 0
        session.commit()
    assert result.get(timeout=30) == 3
    assert app.store.get(result.id).status == states.SUCCEEDED
    with Session(user_engine) as check:
        assert [o.customer for o in check.scalars(sa.select(Order))] == ["acme"]


def test_a_rolled_back_transaction_leaves_no_job_and_no_message(app, backend, user_engine):
    with Session(user_engine) as session:
        with app.transaction(session):
            session.add(Order(customer="globex"))
            result = jobs_project.add.delay(5, 5)
            later = jobs_project.add.apply_async((1, 1), countdown=60)
        session.rollback()
    assert app.store.get(result.id) is None and app.store.get(later.id) is None
    assert app.store.list() == []
    assert app.broker.queue_size(backend.queue) == 0

    with pytest.raises(RuntimeError, match="payment failed"):
        with app.transaction(user_engine) as conn:
            conn.execute(sa.insert(Order).values(customer="initech"))
            failed = jobs_project.add.delay(2, 2)
            raise RuntimeError("payment failed")
    assert app.store.get(failed.id) is None
    assert app.broker.queue_size(backend.queue) == 0
    with Session(user_engine) as check:
        assert check.scalars(sa.select(Order)).all() == []


def test_engine_block_commits_then_publishes(app, backend, user_engine, start_worker):
    with app.transaction(user_engine) as conn:
        conn.execute(sa.insert(Order).values(customer="umbrella"))
        result = jobs_project.add.delay(20, 22)
    assert app.store.get(result.id).status == states.QUEUED
    start_worker()
    assert result.get(timeout=30) == 42


def test_transaction_refuses_what_it_cannot_follow(app, user_engine):
    with user_engine.connect() as conn, pytest.raises(TypeError, match="Session or Engine"):
        app.transaction(conn)

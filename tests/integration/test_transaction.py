"""Transactional enqueue: a job sent inside the caller's transaction lives or dies with it."""

from __future__ import annotations

import jobs_project
import pytest
import sqlalchemy as sa
from helpers import wait_queued
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from heretic_kombu import states, transaction
from heretic_kombu.exceptions import StoreError
from heretic_kombu.store import JobStore


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


def _customers(engine):
    """The orders committed, as another connection sees them."""
    with Session(engine) as check:
        return [order.customer for order in check.scalars(sa.select(Order))]


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
    assert _customers(user_engine) == ["acme"]


def _sqlite_autocommit_off(dbapi_connection, record):
    dbapi_connection.isolation_level = None


@pytest.mark.parametrize("join", ["create_savepoint", "conditional_savepoint"])
@pytest.mark.parametrize("outer_commits", [True, False])
def test_a_session_joined_to_an_outer_transaction_publishes_nothing_at_its_own_commit(
    app, backend, user_engine, join, outer_commits, caplog
):
    # The pattern of test suites (and of some frameworks): a session bound to a connection
    # whose transaction was begun outside it. The session's commit is not the database's.
    if backend.name == "embedded":
        # pysqlite on its defaults commits when a SAVEPOINT begins; SQLAlchemy's recipe
        # for SQLite savepoints, as an application using them would apply it.
        sa.event.listen(user_engine, "connect", _sqlite_autocommit_off)
        sa.event.listen(user_engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN"))
    with user_engine.connect() as connection:
        outer = connection.begin()
        with Session(bind=connection, join_transaction_mode=join) as session:
            with app.transaction(session):
                session.add(Order(customer="hooli"))
                result = jobs_project.add.delay(3, 4)
            session.commit()
        assert app.broker.queue_size(backend.queue) == 0  # the outer one may roll back
        if outer_commits:
            outer.commit()
        else:
            outer.rollback()
    assert app.broker.queue_size(backend.queue) == 0
    row = app.store.get(result.id)
    if outer_commits:  # left for a worker's reconciler, which publishes pending rows
        assert row.status == states.PENDING and _customers(user_engine) == ["hooli"]
        assert "its jobs are not published now" in caplog.text
    else:
        assert row is None and _customers(user_engine) == []


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
    assert _customers(user_engine) == []


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


def test_many_sends_in_one_transaction_are_all_written_in_order_and_published(
    app, backend, user_engine
):
    count = 2500  # more than one batch of rows (transaction.TRANSACTION_BATCH)
    with app.transaction(user_engine) as conn:
        conn.execute(sa.insert(Order).values(customer="hooli"))
        results = [jobs_project.add.delay(i, 1) for i in range(count)]
        assert app.broker.queue_size(backend.queue) == 0
    rows = [app.store.get(result.id) for result in results]
    assert [row.args for row in rows] == [[i, 1] for i in range(count)]
    assert {row.status for row in rows} == {states.QUEUED}
    assert app.broker.queue_size(backend.queue) == count


def test_a_session_that_commits_inside_the_block_and_sends_again_loses_nothing(
    app, backend, user_engine
):
    with Session(user_engine) as session:
        with app.transaction(session):
            first = jobs_project.add.delay(1, 1)
            session.commit()
            assert app.store.get(first.id) is not None
            second = jobs_project.add.delay(2, 2)
            session.add(Order(customer="pied piper"))
        assert app.store.get(second.id) is None  # not committed yet
        session.commit()
    wait_queued(app, first.id)
    assert wait_queued(app, second.id).args == [2, 2]
    assert app.broker.queue_size(backend.queue) == 2


def test_a_row_that_cannot_be_written_fails_the_commit_and_nothing_is_kept(
    app, backend, user_engine
):
    taken = jobs_project.add.delay(0, 0)
    wait_queued(app, taken.id)
    with pytest.raises(StoreError, match="task_id"):
        with app.transaction(user_engine) as conn:
            conn.execute(sa.insert(Order).values(customer="soylent"))
            fresh = jobs_project.add.delay(3, 3)
            jobs_project.add.apply_async((4, 4), task_id=taken.id)
    assert app.store.get(fresh.id) is None
    assert app.store.get(taken.id).args == [0, 0]
    assert app.broker.queue_size(backend.queue) == 1
    assert _customers(user_engine) == []


def test_sends_after_a_rollback_inside_the_block_go_with_the_next_commit(app, backend, user_engine):
    with Session(user_engine) as session:
        with app.transaction(session):
            dropped = jobs_project.add.delay(1, 1)
            session.rollback()
            kept = jobs_project.add.delay(2, 2)
            session.add(Order(customer="initrode"))
        session.commit()
    assert app.store.get(dropped.id) is None
    assert wait_queued(app, kept.id).args == [2, 2]
    assert app.broker.queue_size(backend.queue) == 1


def _kept(app, results):
    """Which of the sent jobs have a row (after the commit)."""
    return [app.store.get(result.id) is not None for result in results]


def test_a_rolled_back_savepoint_drops_only_the_jobs_sent_inside_it(app, backend, user_engine):
    with Session(user_engine) as session:
        with app.transaction(session):
            before = jobs_project.add.delay(1, 1)
            savepoint = session.begin_nested()
            inside = jobs_project.add.delay(2, 2)
            session.add(Order(customer="vandelay"))
            savepoint.rollback()
            after = jobs_project.add.delay(3, 3)
            with session.begin_nested():  # released: its job waits for the real commit
                released = jobs_project.add.delay(4, 4)
            assert app.store.get(released.id) is None
            assert app.broker.queue_size(backend.queue) == 0
        session.commit()
    assert _kept(app, [before, inside, after, released]) == [True, False, True, True]
    for result in (before, after, released):
        wait_queued(app, result.id)
    assert app.broker.queue_size(backend.queue) == 3
    assert _customers(user_engine) == []


def test_savepoints_inside_savepoints_and_a_batch_written_inside_one(app, backend, user_engine):
    with Session(user_engine) as session:
        with app.transaction(session):
            outer_job = jobs_project.add.delay(0, 0)
            outer = session.begin_nested()
            # More than a batch: rows are written inside the savepoint before it ends.
            many = [jobs_project.add.delay(i, 1) for i in range(transaction.TRANSACTION_BATCH + 5)]
            inner = session.begin_nested()
            inner_job = jobs_project.add.delay(9, 9)
            inner.commit()  # released into `outer`...
            outer.rollback()  # ...which takes it down with everything else sent inside
            last = jobs_project.add.delay(5, 5)
        session.commit()
    assert _kept(app, [outer_job, last]) == [True, True]
    assert not any(_kept(app, [*many, inner_job]))
    wait_queued(app, last.id)
    assert app.broker.queue_size(backend.queue) == 2


def test_a_savepoint_begun_before_the_block_takes_the_blocks_jobs_on_rollback(
    app, backend, user_engine
):
    # The job table is in place, made by another process, as in any deployed app. This
    # process's first use of it comes while the session holds SQLite's write lock.
    other_process = JobStore(backend.database_url)
    other_process.create_schema()
    other_process.dispose()
    with Session(user_engine) as session:
        session.add(Order(customer="kramerica"))
        session.flush()
        savepoint = session.begin_nested()
        with app.transaction(session):
            result = jobs_project.add.delay(1, 2)
        savepoint.rollback()
        session.commit()
    assert app.store.get(result.id) is None
    assert app.broker.queue_size(backend.queue) == 0
    assert _customers(user_engine) == ["kramerica"]


def test_an_engine_blocks_savepoints_are_followed(app, backend, user_engine):
    with app.transaction(user_engine) as conn:
        kept = jobs_project.add.delay(1, 1)
        with pytest.raises(RuntimeError), conn.begin_nested():
            dropped = jobs_project.add.delay(2, 2)
            raise RuntimeError("card declined")
        with conn.begin_nested():
            released = jobs_project.add.delay(3, 3)
    assert _kept(app, [kept, dropped, released]) == [True, False, True]
    wait_queued(app, released.id)
    assert app.broker.queue_size(backend.queue) == 2


def test_a_commit_that_fails_after_the_rows_are_written_keeps_no_job(app, backend, user_engine):
    """The rows go through the caller's own connection: they die with its transaction
    even when it fails after heretic wrote them (here, a later before_commit hook)."""
    with Session(user_engine) as session:
        with app.transaction(session):
            result = jobs_project.add.delay(6, 7)

        def audit_refuses(session):
            raise RuntimeError("audit log unavailable")

        sa.event.listen(session, "before_commit", audit_refuses)
        with pytest.raises(RuntimeError, match="audit"):
            session.commit()
        session.rollback()
    assert app.store.get(result.id) is None
    assert app.broker.queue_size(backend.queue) == 0

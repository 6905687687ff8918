"""A database made by an older heretic_kombu (schema 1) is upgraded in place, keeping its jobs."""

from __future__ import annotations

import sqlalchemy as sa

from heretic_kombu.store import SCHEMA_VERSION, JobStore


def test_schema_1_database_is_upgraded_and_keeps_its_rows(isolated_env):
    url = f"sqlite:///{isolated_env}/old.sqlite3"
    store = JobStore(url)
    store.create_schema()
    with store.engine.begin() as conn:  # turn it back into what schema 1 was
        conn.exec_driver_sql("ALTER TABLE heretic_jobs DROP COLUMN workflow")
        conn.exec_driver_sql("DROP TABLE heretic_chords")
        conn.exec_driver_sql("DROP INDEX heretic_jobs_status_created_idx")
        conn.exec_driver_sql("CREATE INDEX heretic_jobs_status_idx ON heretic_jobs (status)")
        for column in ("parent", "group"):  # whole-column indexes until schema 3
            conn.exec_driver_sql(f"DROP INDEX heretic_jobs_{column}_idx")
            conn.exec_driver_sql(
                f"CREATE INDEX heretic_jobs_{column}_id_idx ON heretic_jobs ({column}_id)"
            )
        conn.exec_driver_sql("DELETE FROM heretic_schema_version")
        conn.exec_driver_sql(
            "INSERT INTO heretic_schema_version (version, applied_at) VALUES (1, '2026-01-01')"
        )
        conn.exec_driver_sql(
            "INSERT INTO heretic_jobs (queue_name, task_id, task_name, payload)"
            " VALUES ('celery', '00000000000000000000000000000001', 'old.task',"
            ' \'{"args": [1], "kwargs": {}}\')'
        )
    store.dispose()

    upgraded = JobStore(url)
    assert upgraded.create_schema() is True
    assert upgraded.create_schema() is False  # already current
    inspector = sa.inspect(upgraded.engine)
    assert "workflow" in {c["name"] for c in inspector.get_columns("heretic_jobs")}
    assert inspector.has_table("heretic_chords")
    indexes = {i["name"] for i in inspector.get_indexes("heretic_jobs")}
    assert "heretic_jobs_status_created_idx" in indexes
    assert "heretic_jobs_status_idx" not in indexes
    assert {"heretic_jobs_parent_idx", "heretic_jobs_group_idx"} <= indexes
    assert not {"heretic_jobs_parent_id_idx", "heretic_jobs_group_id_idx"} & indexes
    old = upgraded.get("00000000-0000-0000-0000-000000000001")
    assert old is not None and old.args == [1] and old.workflow is None
    with upgraded.engine.connect() as conn:
        versions = conn.exec_driver_sql("SELECT version FROM heretic_schema_version").scalars()
        assert sorted(versions) == [1, SCHEMA_VERSION]
    upgraded.dispose()


def test_a_database_upgraded_by_a_newer_release_is_left_as_it_is(isolated_env):
    # A process of this release started after a newer one upgraded the database (a
    # rolling deploy) must not "upgrade" it back, nor fail on the version row.
    url = f"sqlite:///{isolated_env}/newer.sqlite3"
    store = JobStore(url)
    store.create_schema()
    with store.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO heretic_schema_version (version, applied_at)"
            f" VALUES ({SCHEMA_VERSION + 1}, '2027-01-01')"
        )
    store.dispose()

    older = JobStore(url)
    assert older.create_schema() is False
    older.ensure_schema()
    with older.engine.connect() as conn:
        versions = conn.exec_driver_sql("SELECT version FROM heretic_schema_version").scalars()
        assert sorted(versions) == [SCHEMA_VERSION, SCHEMA_VERSION + 1]
    older.dispose()

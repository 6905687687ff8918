"""The package's table definitions and sql/schema.sql agree, on a real PostgreSQL."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import PG_ADMIN_URL, require_services

from heretic_kombu.cli.main import cli
from heretic_kombu.store import JobStore, render_postgresql_ddl

SCHEMA_SQL = Path(__file__).resolve().parents[2] / "sql" / "schema.sql"

CATALOG_QUERIES = {
    "columns": """
        SELECT table_name, column_name, data_type, udt_name, is_nullable, column_default
        FROM information_schema.columns WHERE table_schema = 'public' ORDER BY 1, 2""",
    "indexes": "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1",
    "constraints": """
        SELECT conrelid::regclass::text, contype, pg_get_constraintdef(oid)
        FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2, 3""",
    "triggers": """
        SELECT trigger_name, event_manipulation, action_timing, action_statement
        FROM information_schema.triggers ORDER BY 1, 2""",
    "functions": """
        SELECT proname, prosrc FROM pg_proc
        WHERE pronamespace = 'public'::regnamespace ORDER BY 1""",
    "version": "SELECT version FROM heretic_schema_version ORDER BY 1",
}


def test_db_sql_prints_the_committed_schema_file():
    result = CliRunner().invoke(cli, ["db", "sql"])
    assert result.exit_code == 0
    assert result.output == SCHEMA_SQL.read_text(encoding="utf-8") == render_postgresql_ddl()


@pytest.mark.services
def test_schema_file_and_table_definitions_agree_on_postgresql():
    require_services()
    import psycopg2

    admin = psycopg2.connect(PG_ADMIN_URL)
    admin.autocommit = True
    names = [f"heretic_schema_{kind}_{uuid.uuid4().hex[:8]}" for kind in ("pkg", "sql")]
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        with admin.cursor() as cur:
            for name in names:
                cur.execute(f'CREATE DATABASE "{name}"')
        from_package = JobStore(f"{base}/{names[0]}")
        assert from_package.create_schema() is True
        assert from_package.create_schema() is False  # idempotent
        from_package.dispose()
        with psycopg2.connect(f"{base}/{names[1]}") as conn, conn.cursor() as cur:
            cur.execute(SCHEMA_SQL.read_text(encoding="utf-8"))
        catalogs = []
        for name in names:
            with psycopg2.connect(f"{base}/{name}") as conn, conn.cursor() as cur:
                catalog = {}
                for key, query in CATALOG_QUERIES.items():
                    cur.execute(query)
                    catalog[key] = cur.fetchall()
                catalogs.append(catalog)
            conn.close()
        assert catalogs[0] == catalogs[1]
        assert any(
            row[0] == "heretic_jobs_payload_idx" and "gin" in row[1]
            for row in catalogs[0]["indexes"]
        )
        assert [t[0] for t in catalogs[0]["triggers"]] == ["update_heretic_jobs_updated_at"]

        # The original heretic's trigger keeps updated_at current on every UPDATE.
        with psycopg2.connect(f"{base}/{names[1]}") as conn, conn.cursor() as cur:
            cur.execute(
                "INSERT INTO heretic_jobs (queue_name, task_id, task_name, updated_at)"
                " VALUES ('q', gen_random_uuid(), 't', now() - interval '1 day') RETURNING id"
            )
            job_id = cur.fetchone()[0]
            cur.execute("UPDATE heretic_jobs SET status = 'queued' WHERE id = %s", (job_id,))
            cur.execute(
                "SELECT now() - updated_at < interval '1 minute', attempt_logs"
                " FROM heretic_jobs WHERE id = %s",
                (job_id,),
            )
            assert cur.fetchone() == (True, [])
        conn.close()
    finally:
        with admin.cursor() as cur:
            for name in names:
                cur.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (name,),
                )
                cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


@pytest.mark.services
def test_a_schema_2_database_on_postgresql_gets_the_partial_indexes_and_keeps_its_rows():
    require_services()
    import psycopg2

    admin = psycopg2.connect(PG_ADMIN_URL)
    admin.autocommit = True
    name = f"heretic_upgrade_{uuid.uuid4().hex[:8]}"
    url = f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        store = JobStore(url)
        store.create_schema()
        store.dispose()
        with psycopg2.connect(url) as conn, conn.cursor() as cur:  # back to schema 2
            for column in ("parent", "group"):
                cur.execute(f"DROP INDEX heretic_jobs_{column}_idx")
                cur.execute(
                    f"CREATE INDEX heretic_jobs_{column}_id_idx ON heretic_jobs ({column}_id)"
                )
            cur.execute("DELETE FROM heretic_schema_version")
            cur.execute("INSERT INTO heretic_schema_version (version) VALUES (2)")
            cur.execute(
                "INSERT INTO heretic_jobs (queue_name, task_id, task_name, parent_id)"
                " VALUES ('q', gen_random_uuid(), 't', gen_random_uuid())"
            )
        conn.close()

        upgraded = JobStore(url)
        assert upgraded.create_schema() is True
        upgraded.dispose()
        with psycopg2.connect(url) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT indexname, indexdef FROM pg_indexes"
                " WHERE indexname LIKE 'heretic_jobs_parent%'"
                " OR indexname LIKE 'heretic_jobs_group%'"
            )
            indexes = dict(cur.fetchall())
            cur.execute("SELECT count(*) FROM heretic_jobs WHERE parent_id IS NOT NULL")
            kept = cur.fetchone()[0]
            cur.execute("SELECT version FROM heretic_schema_version ORDER BY 1")
            versions = [row[0] for row in cur.fetchall()]
        conn.close()
        assert sorted(indexes) == ["heretic_jobs_group_idx", "heretic_jobs_parent_idx"]
        assert indexes["heretic_jobs_parent_idx"].endswith("WHERE (parent_id IS NOT NULL)")
        assert indexes["heretic_jobs_group_idx"].endswith("WHERE (group_id IS NOT NULL)")
        assert kept == 1
        assert versions == [2, 3]
    finally:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
            )
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()

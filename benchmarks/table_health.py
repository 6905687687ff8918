"""Table health of ``heretic_jobs`` under job churn (HOT updates, dead tuples, bloat).

Drives N jobs through the lifecycle every job goes through -- insert (pending), mark
queued, claim (started), record the attempt (succeeded) -- on a fresh PostgreSQL database
per schema variant, then reports table/index sizes, pg_stat_user_tables counters (HOT
ratio, dead tuples, autovacuum) and the sizes after a plain VACUUM.

Two drivers, same columns changed:
  --mode store : the real JobStore methods (insert_plan, mark_queued per job, claim_many,
                 record_attempts with AttemptResult succeeded).
  --mode sql   : the same statements as set-based SQL, one statement per step per batch.

    python -m benchmarks.table_health --jobs 20000 --variants base,ff80 --mode store

Scratch/diagnostic tool: not part of ``nox -s bench``. Every database it creates is
named health_<variant>_<pid> and dropped at the end (also on error).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg2

PG_ADMIN = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
TERMINAL = ("succeeded", "failed", "revoked", "ignored")
NON_TERMINAL = ("pending", "scheduled", "queued", "started", "retrying")
WORKER = "celery@bench-host"

# Schema variants, applied after create_schema() and before any row is written.
_ACTIVE = (
    "CREATE INDEX heretic_jobs_active_idx ON heretic_jobs (status, created_at, id) "
    "WHERE status IN ('pending', 'scheduled', 'queued', 'started', 'retrying')"
)
VARIANTS: dict[str, list[str]] = {
    "base": [],
    "ff80": ["ALTER TABLE heretic_jobs SET (fillfactor = 80)"],
    # (b) the status-leading index replaced by a partial index on unfinished rows only
    "partial": ["DROP INDEX heretic_jobs_status_created_idx", _ACTIVE],
    # (c) = (a) + (b)
    "ff80+partial": [
        "ALTER TABLE heretic_jobs SET (fillfactor = 80)",
        "DROP INDEX heretic_jobs_status_created_idx",
        _ACTIVE,
    ],
    # (d) reference: no index mentions status at all (neither as a key nor in a
    # predicate) -- what it takes for status changes to be HOT on PostgreSQL <= 17.
    "nostatus": [
        "DROP INDEX heretic_jobs_status_created_idx",
        "DROP INDEX heretic_jobs_due_idx",
        "CREATE INDEX heretic_jobs_due_idx ON heretic_jobs (eta) WHERE eta IS NOT NULL",
    ],
    "ff80+nostatus": [
        "ALTER TABLE heretic_jobs SET (fillfactor = 80)",
        "DROP INDEX heretic_jobs_status_created_idx",
        "DROP INDEX heretic_jobs_due_idx",
        "CREATE INDEX heretic_jobs_due_idx ON heretic_jobs (eta) WHERE eta IS NOT NULL",
    ],
    # reference: schema 2's whole-column parent_id and group_id indexes (schema 3 indexes
    # only the rows where they are set)
    "schema2": [
        "DROP INDEX heretic_jobs_parent_idx",
        "DROP INDEX heretic_jobs_group_idx",
        "CREATE INDEX heretic_jobs_parent_id_idx ON heretic_jobs (parent_id)",
        "CREATE INDEX heretic_jobs_group_id_idx ON heretic_jobs (group_id)",
    ],
}


def _db_url(name: str) -> str:
    return PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"


def _admin() -> Any:
    conn = psycopg2.connect(PG_ADMIN)
    conn.autocommit = True
    return conn


def _connect(name: str) -> Any:
    conn = psycopg2.connect(_db_url(name))
    conn.autocommit = True
    return conn


# -- drivers -------------------------------------------------------------------------


def _payload(i: int) -> str:
    return json.dumps(
        {"args": [i], "kwargs": {"to": f"user{i % 5000}@example.com", "amount": i % 1000}}
    )


def run_store(url: str, jobs: int, batch: int, claim_batch: int, bulk_queued: bool) -> list[float]:
    """The real JobStore methods; returns the wall seconds of each batch of ``batch`` jobs."""
    from heretic_kombu.serialization import RawJSON
    from heretic_kombu.store import Attempt, AttemptResult, JobStore, NewJob, log_line, utcnow

    store = JobStore(url)
    store.ensure_schema()
    times = []
    for start in range(0, jobs, batch):
        t0 = time.perf_counter()
        new = [
            NewJob(
                task_id=str(uuid.uuid4()),
                task_name=f"bench.task{i % 10}",
                queue_name=("celery", "mail", "reports")[i % 3],
                payload=RawJSON(_payload(i)),
                max_attempts=1,
            )
            for i in range(start, min(start + batch, jobs))
        ]
        rows = store.insert_plan(new)
        ids = [r.task_id for r in rows]
        if bulk_queued:
            _bulk_mark_queued(store, ids)
        else:
            for task_id in ids:  # what the producer does after each confirmed publish
                store.mark_queued(task_id)
        for c in range(0, len(ids), claim_batch):
            claimed = store.claim_many(ids[c : c + claim_batch], WORKER)
            now = utcnow()
            attempts = [
                Attempt(
                    job.task_id,
                    job.attempts,
                    AttemptResult(
                        "succeeded",
                        log_line(now, job.attempts, WORKER, "succeeded in 0.001s"),
                        result=RawJSON(str(job.id)),
                    ),
                )
                for job in claimed.values()
            ]
            assert len(attempts) == len(ids[c : c + claim_batch]), "claim missed rows"
            store.record_attempts(attempts)
        times.append(time.perf_counter() - t0)
    store.dispose()
    return times


def _bulk_mark_queued(store: Any, ids: list[str]) -> None:
    """mark_queued's statement for a batch of task ids (same columns, one commit)."""
    from heretic_kombu.store import jobs, utcnow

    with store._write() as conn:
        conn.execute(
            jobs.update()
            .where(jobs.c.task_id.in_(ids), jobs.c.status == "pending")
            .values(status="queued", updated_at=utcnow())
        )


_SQL_INSERT = """
INSERT INTO heretic_jobs (task_id, task_name, queue_name, status, payload, attempt_logs,
    max_attempts, attempts, created_at, updated_at)
SELECT gen_random_uuid(), 'bench.task' || (g %% 10), (ARRAY['celery','mail','reports'])[1 + g %% 3],
       'pending',
       jsonb_build_object('args', jsonb_build_array(g), 'kwargs',
           jsonb_build_object('to', 'user' || (g %% 5000) || '@example.com', 'amount', g %% 1000)),
       '{}'::text[], 1, 0, now(), now()
FROM generate_series(%(lo)s, %(hi)s) AS g
RETURNING task_id::text
"""
_SQL_QUEUED = """
UPDATE heretic_jobs SET status = 'queued', updated_at = now()
WHERE task_id = ANY(%(ids)s::uuid[]) AND status = 'pending'
"""
_SQL_CLAIM = """
UPDATE heretic_jobs SET status = 'started', attempts = attempts + 1, worker = %(worker)s,
    started_at = now(), last_attempted_at = now(), finished_at = NULL, updated_at = now()
WHERE task_id = ANY(%(ids)s::uuid[])
  AND (status IN ('pending', 'queued') OR (status IN ('scheduled', 'retrying') AND eta <= now()))
  AND (expires_at IS NULL OR expires_at > now())
RETURNING task_id::text, attempts, id
"""
_SQL_FINISH = """
UPDATE heretic_jobs SET status = 'succeeded', updated_at = now(),
    attempt_logs = array_append(attempt_logs, %(line)s || ' attempt 1 on ' || worker
                                || ': succeeded in 0.001s'),
    error = NULL, traceback = NULL, result = to_jsonb(id), finished_at = now()
WHERE task_id = ANY(%(ids)s::uuid[]) AND status = 'started' AND attempts = 1
"""


def run_sql(name: str, jobs: int, batch: int, claim_batch: int) -> list[float]:
    conn = _connect(name)
    conn.autocommit = False
    cur = conn.cursor()
    times = []
    for start in range(0, jobs, batch):
        t0 = time.perf_counter()
        cur.execute(_SQL_INSERT, {"lo": start, "hi": min(start + batch, jobs) - 1})
        ids = [r[0] for r in cur.fetchall()]
        conn.commit()
        cur.execute(_SQL_QUEUED, {"ids": ids})
        conn.commit()
        for c in range(0, len(ids), claim_batch):
            part = ids[c : c + claim_batch]
            cur.execute(_SQL_CLAIM, {"ids": part, "worker": WORKER})
            assert len(cur.fetchall()) == len(part)
            conn.commit()
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
            cur.execute(_SQL_FINISH, {"ids": part, "line": stamp})
            cur.execute("SELECT pg_notify('heretic_done', 'x')")
            conn.commit()
        times.append(time.perf_counter() - t0)
    conn.close()
    return times


_PROC = """
CREATE OR REPLACE PROCEDURE health_lifecycle(lo int, hi int, claim_batch int, worker text)
LANGUAGE plpgsql AS $$
DECLARE
  ids uuid[];
  part uuid[];
  i int;
  n int;
BEGIN
  WITH ins AS (
    INSERT INTO heretic_jobs (task_id, task_name, queue_name, status, payload, attempt_logs,
        max_attempts, attempts, created_at, updated_at)
    SELECT gen_random_uuid(), 'bench.task' || (g % 10),
           (ARRAY['celery','mail','reports'])[1 + g % 3], 'pending',
           jsonb_build_object('args', jsonb_build_array(g), 'kwargs',
               jsonb_build_object('to', 'user' || (g % 5000) || '@example.com',
                                  'amount', g % 1000)),
           '{}'::text[], 1, 0, clock_timestamp(), clock_timestamp()
    FROM generate_series(lo, hi) AS g
    RETURNING id, task_id)
  SELECT array_agg(task_id ORDER BY id) INTO ids FROM ins;
  COMMIT;
  n := array_length(ids, 1);
  -- mark_queued: one row, one transaction, as the producer does after each publish
  FOR i IN 1..n LOOP
    UPDATE heretic_jobs SET status = 'queued', updated_at = clock_timestamp()
    WHERE task_id = ids[i] AND status = 'pending';
    COMMIT;
  END LOOP;
  -- claim_many then record_attempts, claim_batch rows per statement, one commit each
  i := 1;
  WHILE i <= n LOOP
    part := ids[i:i + claim_batch - 1];
    UPDATE heretic_jobs SET status = 'started', attempts = attempts + 1,
        worker = health_lifecycle.worker,
        started_at = clock_timestamp(), last_attempted_at = clock_timestamp(), finished_at = NULL,
        updated_at = clock_timestamp()
    WHERE task_id = ANY(part)
      AND (status IN ('pending', 'queued')
           OR (status IN ('scheduled', 'retrying') AND eta <= clock_timestamp()))
      AND (expires_at IS NULL OR expires_at > clock_timestamp());
    COMMIT;
    UPDATE heretic_jobs SET status = 'succeeded', updated_at = clock_timestamp(),
        attempt_logs = array_append(attempt_logs, to_char(clock_timestamp() AT TIME ZONE 'UTC',
            'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') || ' attempt 1 on ' || health_lifecycle.worker
            || ': succeeded in 0.001s'),
        error = NULL, traceback = NULL, result = to_jsonb(id), finished_at = clock_timestamp()
    WHERE task_id = ANY(part) AND status = 'started' AND attempts = 1;
    PERFORM pg_notify('heretic_done', 'x');
    COMMIT;
    i := i + claim_batch;
  END LOOP;
END $$
"""


def run_proc(name: str, jobs: int, batch: int, claim_batch: int) -> list[float]:
    """Row-level transactions server-side (mark_queued per row, claim/record per
    ``claim_batch`` rows), synchronous_commit off for speed (table health is the same)."""
    conn = _connect(name)
    cur = conn.cursor()
    cur.execute(_PROC)
    cur.execute("SET synchronous_commit = off")
    # PL/pgSQL would otherwise keep a generic plan made while the table was tiny (no
    # ANALYZE without autovacuum), a bitmap scan of the status index that grows with
    # the dead entries; the application's statements are planned each time.
    cur.execute("SET plan_cache_mode = force_custom_plan")
    times = []
    for start in range(0, jobs, batch):
        t0 = time.perf_counter()
        cur.execute(
            "CALL health_lifecycle(%s, %s, %s, %s)",
            (start, min(start + batch, jobs) - 1, claim_batch, WORKER),
        )
        times.append(time.perf_counter() - t0)
    conn.close()
    return times


# -- measuring ---------------------------------------------------------------------------


def measure(name: str) -> dict[str, Any]:
    conn = _connect(name)
    cur = conn.cursor()
    cur.execute("SELECT pg_stat_force_next_flush()")
    time.sleep(1.5)  # other backends flush their counters at most once a second
    cur.execute("SELECT pg_stat_clear_snapshot()")
    out: dict[str, Any] = {}
    cur.execute(
        "SELECT pg_relation_size('heretic_jobs'), pg_table_size('heretic_jobs'),"
        " pg_indexes_size('heretic_jobs'), pg_total_relation_size('heretic_jobs')"
    )
    out["heap"], out["table"], out["indexes"], out["total"] = cur.fetchone()
    cur.execute(
        "SELECT c.relname, pg_relation_size(c.oid) FROM pg_index i JOIN pg_class c"
        " ON c.oid = i.indexrelid WHERE i.indrelid = 'heretic_jobs'::regclass ORDER BY 1"
    )
    out["per_index"] = dict(cur.fetchall())
    cur.execute(
        "SELECT n_live_tup, n_dead_tup, n_tup_ins, n_tup_upd, n_tup_hot_upd, last_autovacuum,"
        " autovacuum_count, last_vacuum, vacuum_count FROM pg_stat_user_tables"
        " WHERE relname = 'heretic_jobs'"
    )
    cols = [d[0] for d in cur.description]
    out["stats"] = {
        k: (str(v) if v is not None and k.startswith("last") else v)
        for k, v in zip(cols, cur.fetchone(), strict=False)
    }
    cur.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
    cur.execute(
        "SELECT tuple_count, dead_tuple_count, dead_tuple_percent, free_percent"
        " FROM pgstattuple('heretic_jobs')"
    )
    out["pgstattuple"] = dict(zip([d[0] for d in cur.description], cur.fetchone(), strict=False))
    conn.close()
    return out


def vacuum(name: str) -> float:
    conn = _connect(name)
    t0 = time.perf_counter()
    conn.cursor().execute("VACUUM heretic_jobs")
    conn.close()
    return time.perf_counter() - t0


def one_variant(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    from heretic_kombu.store import JobStore

    name = f"health_{variant.replace('+', '_')}_{os.getpid()}"
    admin = _admin()
    admin.cursor().execute(f'CREATE DATABASE "{name}"')
    try:
        store = JobStore(_db_url(name))
        store.create_schema()
        store.dispose()
        conn = _connect(name)
        for ddl in VARIANTS[variant]:
            conn.cursor().execute(ddl)
        conn.close()
        if args.mode == "store":
            times = run_store(
                _db_url(name), args.jobs, args.batch, args.claim_batch, args.bulk_queued
            )
        elif args.mode == "proc":
            times = run_proc(name, args.jobs, args.batch, args.claim_batch)
        else:
            times = run_sql(name, args.jobs, args.batch, args.claim_batch)
        result: dict[str, Any] = {
            "variant": variant,
            "mode": args.mode,
            "jobs": args.jobs,
            "batch": args.batch,
            "loop_seconds": sum(times),
            "ms_per_1000_median": 1000 * statistics.median(times) * 1000 / args.batch,
            "ms_per_1000_mean": 1000 * sum(times) / args.jobs * 1000,
            "ms_per_1000_p90": 1000
            * sorted(times)[int(0.9 * (len(times) - 1))]
            * 1000
            / args.batch,
            "batch_ms": [round(1000 * t, 1) for t in times],
            "before_vacuum": measure(name),
        }
        result["vacuum_seconds"] = vacuum(name)
        result["after_vacuum"] = measure(name)
        return result
    finally:
        cur = admin.cursor()
        cur.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--claim-batch", type=int, default=1000)
    parser.add_argument("--mode", choices=("store", "sql", "proc"), default="store")
    parser.add_argument(
        "--bulk-queued",
        action="store_true",
        help="mark_queued's UPDATE for a whole batch in one statement",
    )
    parser.add_argument("--variants", default="base")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = []
    for variant in args.variants.split(","):
        result = one_variant(variant.strip(), args)
        results.append(result)
        print(json.dumps(result, default=str), flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``nox -s bench``: heretic_kombu and Celery side by side, on the same RabbitMQ and PostgreSQL.

Each round runs every workload on each implementation in turn (alternating, so a noisy
moment of the machine hits all of them), and the table reports medians over the rounds,
min–max, and the ratio heretic/Celery. Besides wall-clock rates, every run records the
CPU time of the whole stack per job — this process, the worker and its pool children,
RabbitMQ and every PostgreSQL process — read from /proc, which is steadier than wall
time on a small, noisy machine.

Implementations: ``heretic``; ``celery-db`` (Celery with the ``db+postgresql://`` result
backend: job outcomes in PostgreSQL, the like-for-like peer); ``celery`` (no result
backend: the speed reference, recording nothing).

    python -m benchmarks.run [--rounds 3] [--jobs 10000] [--roundtrips 500]
                             [--only enqueue,drain,roundtrip,memory,search]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
IMPLEMENTATIONS = ("heretic", "celery-db", "celery")
TICKS = os.sysconf("SC_CLK_TCK")


# -- CPU time of the whole stack, from /proc ---------------------------------------


def _proc_times(pid: int, children: bool = False) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    total = utime + stime + ((cutime + cstime) if children else 0)
    return total / TICKS


def _pids(name: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == name:
                    found.append(int(entry.name))
    return found


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(parents.get(current, ()))
    return out


class StackClock:
    """CPU seconds used by the client, one worker tree, RabbitMQ and PostgreSQL."""

    def __init__(self, worker_pid: int | None = None) -> None:
        self.worker_pid = worker_pid

    def read(self) -> float:
        total = sum(os.times()[:2])  # this process
        if self.worker_pid is not None:
            total += sum(_proc_times(p) for p in _tree(self.worker_pid))
        total += sum(_proc_times(p) for p in _pids("beam.smp"))
        postgres = _pids("postgres")
        # Backends that exited were reaped by the postmaster: their time is in its cutime.
        total += sum(_proc_times(p, children=(p == min(postgres))) for p in postgres)
        return total


# -- one implementation ---------------------------------------------------------------


@dataclasses.dataclass
class Run:
    impl: str
    database: str
    queue: str
    marker: Path
    worker: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            BENCH_IMPL=self.impl,
            BENCH_QUEUE=self.queue,
            BENCH_DATABASE=self.database,
            BENCH_MARKER=str(self.marker),
            BENCH_BROKER=AMQP,
            PYTHONPATH=str(ROOT),
            HERETIC_DATABASE_URL=self.database,
            HERETIC_BROKER_URL=AMQP,
            HERETIC_DEFAULT_QUEUE=self.queue,
        )
        return env

    def project(self) -> Any:
        """The task module, imported in this process for this implementation."""
        os.environ.update(self.env)
        for name in [m for m in sys.modules if m == "benchmarks.bench_project"]:
            del sys.modules[name]
        import benchmarks.bench_project as project

        return project

    def start_worker(self) -> None:
        if self.impl == "heretic":
            command = ["-m", "heretic_kombu.cli", "-A", "benchmarks.bench_project", "worker"]
            command += ["-l", "warning", "-Q", self.queue]
        else:
            command = ["-m", "celery", "-A", "benchmarks.bench_project", "worker", "-l", "warning"]
            command += ["-Q", self.queue, "--without-gossip", "--without-mingle"]
            command += ["--without-heartbeat", "-P", "prefork"]
        self.worker = subprocess.Popen(
            [sys.executable, *command],
            env=self.env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def stop_worker(self) -> None:
        if self.worker is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.worker.pid, signal.SIGTERM)
        try:
            self.worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.worker.pid, signal.SIGKILL)
            self.worker.wait()
        self.worker = None

    def done(self, engine: sa.Engine) -> int:
        """Jobs finished, as this implementation can tell."""
        if self.impl == "celery":
            return self.marker.stat().st_size if self.marker.exists() else 0
        with engine.connect() as conn:
            if self.impl == "heretic":
                sql = "SELECT count(*) FROM heretic_jobs WHERE status = 'succeeded'"
            else:
                if not sa.inspect(conn).has_table("celery_taskmeta"):
                    return 0
                sql = "SELECT count(*) FROM celery_taskmeta WHERE status = 'SUCCESS'"
            return int(conn.exec_driver_sql(sql).scalar_one())


@contextlib.contextmanager
def fresh_run(impl: str) -> Iterator[Run]:
    """A database and a queue of the run's own, dropped afterwards."""
    name = f"bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(_driver(PG_ADMIN), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    database = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    marker = Path(tempfile.mkdtemp()) / "done"
    run = Run(impl, database, f"{name}_q", marker)
    try:
        yield run
    finally:
        run.stop_worker()
        _delete_queue(run.queue)
        with admin.connect() as conn:
            conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        admin.dispose()


def _driver(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg2://", 1)


def _delete_queue(queue: str) -> None:
    import kombu

    with kombu.Connection(AMQP) as conn:
        for name in (queue, f"{queue}.dead"):
            with contextlib.suppress(Exception):
                conn.default_channel.queue_delete(name)
            with contextlib.suppress(Exception):
                conn.default_channel.exchange_delete(name)


def _ready_messages(queue: str) -> int:
    """Messages in ``queue`` not yet delivered to a consumer."""
    import kombu

    with kombu.Connection(AMQP) as conn:
        return int(conn.default_channel.queue_declare(queue, passive=True).message_count)


def _prepare(run: Run, project: Any) -> None:
    """Create tables and queues before any clock starts."""
    if run.impl == "heretic":
        project.app.store.ensure_schema()
        project.app.broker.queue_size(run.queue)
    else:
        with project.app.connection_for_write() as conn:
            project.app.amqp.queues[run.queue](conn.default_channel).declare()


# -- workloads ---------------------------------------------------------------------------


def measure(count: int, clock: StackClock, work: Callable[[], None]) -> dict[str, float]:
    cpu0, wall0 = clock.read(), time.perf_counter()
    work()
    wall, cpu = time.perf_counter() - wall0, clock.read() - cpu0
    return {"rate": count / wall, "seconds": wall, "cpu_ms_per_job": 1000 * cpu / count}


def enqueue(run: Run, jobs: int) -> dict[str, dict[str, float]]:
    project = run.project()
    _prepare(run, project)
    out = {"enqueue .delay()": measure(jobs, StackClock(), lambda: _delay_loop(project, jobs))}
    if run.impl == "heretic":
        engine = sa.create_engine(_driver(run.database))

        def in_transaction() -> None:
            with project.app.transaction(engine):
                for i in range(jobs):
                    project.noop.delay(i)

        out["enqueue in 1 transaction"] = measure(jobs, StackClock(), in_transaction)
        engine.dispose()
    bulk = project.group(project.noop.s(i) for i in range(jobs))
    out["enqueue group()"] = measure(jobs, StackClock(), lambda: bulk.apply_async())
    return out


def _delay_loop(project: Any, jobs: int) -> None:
    for i in range(jobs):
        project.noop.delay(i)


def drain(run: Run, jobs: int) -> dict[str, dict[str, float]]:
    project = run.project()
    _prepare(run, project)
    engine = sa.create_engine(_driver(run.database))
    bulk = project.group(project.noop.s(i) for i in range(jobs))
    bulk.apply_async()
    clock = StackClock()
    cpu0, wall0 = clock.read(), time.perf_counter()
    run.start_worker()
    assert run.worker is not None
    clock.worker_pid = run.worker.pid
    cpu0 += 0.0  # the worker's own time starts at zero
    deadline = time.monotonic() + 600
    while run.done(engine) < jobs:
        if time.monotonic() > deadline or run.worker.poll() is not None:
            raise RuntimeError(f"{run.impl}: drain did not finish")
        time.sleep(0.05)
    wall, cpu = time.perf_counter() - wall0, clock.read() - cpu0
    run.stop_worker()
    engine.dispose()
    return {"drain": {"rate": jobs / wall, "seconds": wall, "cpu_ms_per_job": 1000 * cpu / jobs}}


def roundtrip(run: Run, calls: int) -> dict[str, dict[str, float]]:
    if run.impl == "celery":
        return {}  # without a result backend there is nothing to wait on
    project = run.project()
    _prepare(run, project)
    run.start_worker()
    options = {"interval": 0.001} if run.impl == "celery-db" else {}
    project.noop.delay(0).get(timeout=60, **options)  # warm: worker up, connections open
    samples = []
    for i in range(calls):
        start = time.perf_counter()
        project.noop.delay(i).get(timeout=30, **options)
        samples.append(1000 * (time.perf_counter() - start))
    run.stop_worker()
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {"round trip": {"p50_ms": cuts[49], "p95_ms": cuts[94], "p99_ms": cuts[98]}}


def _rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its children, in MB."""
    total = 0
    for member in _tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


def memory(run: Run, jobs: int) -> dict[str, dict[str, float]]:
    """Worker RSS: idle, with ``jobs`` countdown jobs (due in an hour) waiting, and the
    peak while draining ``jobs`` jobs.

    ``countdown_held`` says how many of the countdown jobs the worker's figure covers:
    heretic's wait in the table, all of them; Celery's worker holds the messages it has
    fetched (unacked, in memory) and fetches eta messages slowly, so its figure covers
    only those no longer ready in the queue when the RSS is read."""
    project = run.project()
    _prepare(run, project)
    run.start_worker()
    assert run.worker is not None
    time.sleep(8)  # started and settled
    idle = _rss_mb(run.worker.pid)
    later = project.group(project.noop.s(i) for i in range(jobs))
    later.apply_async(countdown=3600)
    time.sleep(20)  # Celery's worker fetches the eta messages; heretic's scheduler ticks
    waiting = _rss_mb(run.worker.pid)
    held = jobs if run.impl == "heretic" else jobs - _ready_messages(run.queue)
    run.stop_worker()
    engine = sa.create_engine(_driver(run.database))
    if run.impl == "heretic":  # the countdown rows stay in the table; count from here
        with engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM heretic_jobs")
    else:
        _delete_queue(run.queue)
        _prepare(run, project)
    project.group(project.noop.s(i) for i in range(jobs)).apply_async()
    run.start_worker()
    peak = 0.0
    deadline = time.monotonic() + 1200
    while run.done(engine) < jobs and time.monotonic() < deadline:
        peak = max(peak, _rss_mb(run.worker.pid))
        time.sleep(0.2)
    run.stop_worker()
    engine.dispose()
    return {
        "memory": {
            "idle_mb": idle,
            "countdown_waiting_mb": waiting,
            "waiting_minus_idle_mb": waiting - idle,
            "countdown_held": held,
            "draining_peak_mb": peak,
        }
    }


SEARCHES: dict[str, dict[str, Any]] = {
    "--status failed": {"status": "failed"},
    "--task": {"task": "bench.task3"},
    "--queue": {"queue": "mail"},
    "--status + --task": {"status": "failed", "task": "bench.task3"},
    "--where kwargs.to=": {"where": ["kwargs.to=user42@example.com"]},
    "--where kwargs.amount>": {"where": ["kwargs.amount>990"]},
    "--payload": {"payload": {"kwargs": {"to": "user42@example.com"}}},
    "--error-contains": {"error_contains": "Timeout"},
    "--since 2h": {"since": "2h"},
    "--until 20d": {"until": "20d"},
    "--root": {"root_id": "00000000-0000-4000-8000-000000004242"},
    "(no filter)": {},
}


def search(rows: int) -> dict[str, dict[str, Any]]:
    """First page (50 rows) of each CLI filter on ``rows`` jobs in PostgreSQL, with the
    indexes the plan uses. heretic only: Celery has no job history to search."""
    with fresh_run("heretic") as run:
        project = run.project()
        store = project.app.store
        store.ensure_schema()
        with store.engine.begin() as conn:
            conn.exec_driver_sql(_FILL, {"rows": rows})
            conn.exec_driver_sql("ANALYZE heretic_jobs")
        out: dict[str, dict[str, Any]] = {}
        for name, filters in SEARCHES.items():
            samples = []
            for _ in range(7):
                start = time.perf_counter()
                page = project.app.jobs.search(**filters, limit=50)
                samples.append(1000 * (time.perf_counter() - start))
            out[name] = {
                "first_page_ms": statistics.median(samples),
                "rows": len(page.rows),
                "indexes": _plan_indexes(project.app, filters),
            }
        return out


def _plan_indexes(app: Any, filters: dict[str, Any]) -> str:
    from heretic_kombu.search import JobQuery

    statement = app.jobs.history.select(JobQuery.build(**filters, limit=50))
    compiled = statement.compile(
        dialect=app.store.engine.dialect, compile_kwargs={"render_postcompile": True}
    )
    raw = app.store.engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute(f"EXPLAIN {compiled.string}", compiled.params)
        plan = [r[0] for r in cursor.fetchall()]
    finally:
        raw.close()
    used = sorted({word for line in plan for word in line.split() if word.startswith("heretic_")})
    return ", ".join(u for u in used if u != "heretic_jobs") or "seq scan"


# Synthetic history: 10 tasks, 3 queues, 5,000 recipients, 30 days; 90% succeeded.
_FILL = """
INSERT INTO heretic_jobs (queue_name, status, payload, attempt_logs, max_attempts, created_at,
    updated_at, task_id, task_name, attempts, error, root_id, started_at, finished_at)
SELECT (ARRAY['celery', 'mail', 'reports'])[1 + g %% 3],
       CASE WHEN g / 7 %% 20 = 0 THEN 'failed' WHEN g %% 50 = 1 THEN 'queued'
            ELSE 'succeeded' END,
       jsonb_build_object(
           'args', jsonb_build_array(g),
           'kwargs', jsonb_build_object('to', 'user' || (g %% 5000) || '@example.com',
                                        'amount', g %% 1000)),
       ARRAY['attempt 1'], 4, t, t, md5(g::text)::uuid, 'bench.task' || (g %% 10), 1,
       CASE WHEN g / 7 %% 20 = 0 THEN
           (ARRAY['TimeoutError: upstream took too long', 'ValueError: bad input'])[1 + g %% 2]
       END,
       CASE WHEN g = 4242 THEN '00000000-0000-4000-8000-000000004242'::uuid
            ELSE md5(g::text)::uuid END,
       t, t + interval '20 ms'
FROM generate_series(1, %(rows)s) AS g,
     LATERAL (SELECT now() - (%(rows)s - g) * interval '30 days' / %(rows)s AS t) AS times
"""


WORKLOADS: dict[str, Callable[[Run, argparse.Namespace], dict[str, dict[str, float]]]] = {
    "enqueue": lambda run, a: enqueue(run, a.jobs),
    "drain": lambda run, a: drain(run, a.jobs),
    "roundtrip": lambda run, a: roundtrip(run, a.roundtrips),
    "memory": lambda run, a: memory(run, a.memory_jobs),
}


# -- the table ---------------------------------------------------------------------------


def report(results: dict[tuple[str, str, str], list[float]]) -> str:
    """Medians, min–max and ratios heretic/Celery per workload and metric."""
    lines = [
        "| workload | metric | heretic | celery-db | celery | heretic/celery-db | heretic/celery |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    keys = sorted({(w, m) for w, m, _ in results}, key=lambda k: (_ORDER.get(k[0], 9), k))
    for workload, metric in keys:
        cells, medians = [], {}
        for impl in IMPLEMENTATIONS:
            values = results.get((workload, metric, impl))
            if not values:
                cells.append("—")
                continue
            medians[impl] = statistics.median(values)
            cells.append(f"{medians[impl]:,.1f} ({min(values):,.1f}–{max(values):,.1f})")
        ratios = []
        for peer in ("celery-db", "celery"):
            if "heretic" in medians and medians.get(peer):
                ratios.append(f"{medians['heretic'] / medians[peer]:.2f}×")
            else:
                ratios.append("—")
        lines.append(f"| {workload} | {metric} | {' | '.join(cells)} | {' | '.join(ratios)} |")
    return "\n".join(lines)


_ORDER = {"enqueue .delay()": 0, "enqueue in 1 transaction": 1, "enqueue group()": 2, "drain": 3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--roundtrips", type=int, default=500)
    parser.add_argument("--memory-jobs", type=int, default=100_000)
    parser.add_argument("--search-rows", type=int, default=1_000_000)
    parser.add_argument("--only", default="enqueue,drain,roundtrip")
    parser.add_argument("--impl", default=",".join(IMPLEMENTATIONS))
    parser.add_argument("--json", type=Path, help="also write the raw samples here")
    args = parser.parse_args()
    chosen = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = set(chosen) - set(WORKLOADS) - {"search"}
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    impls = [i.strip() for i in args.impl.split(",") if i.strip()]
    results: dict[tuple[str, str, str], list[float]] = {}
    for round_number in range(1, args.rounds + 1):
        for name in (c for c in chosen if c in WORKLOADS):
            for impl in impls if round_number % 2 else list(reversed(impls)):
                with fresh_run(impl) as run:
                    measured = WORKLOADS[name](run, args)
                for workload, metrics in measured.items():
                    for metric, value in metrics.items():
                        results.setdefault((workload, metric, impl), []).append(value)
                    print(f"round {round_number} {impl:9} {workload:24} {metrics}", flush=True)
    print()
    print(f"{args.rounds} rounds, {args.jobs} jobs, {args.roundtrips} round trips; ", end="")
    print(f"{os.cpu_count()} CPUs; medians (min–max); rates in jobs/s, CPU in ms per job")
    print(report(results))
    if "search" in chosen:
        print(f"\nsearch: first page of 50 on {args.search_rows:,} rows (PostgreSQL), median of 7")
        print("| filter | ms | rows | indexes in the plan |\n| --- | --- | --- | --- |")
        for name, found in search(args.search_rows).items():
            print(
                f"| {name} | {found['first_page_ms']:.1f} | {found['rows']} | {found['indexes']} |"
            )
    if args.json:
        args.json.write_text(json.dumps({"|".join(k): v for k, v in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

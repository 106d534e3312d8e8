"""Soak jarvis-deploy: many blue-green deployments under steady load while the worker is killed and Redis is flushed.

The script starts the same private setup as bench/zero_downtime.py: its own Caddy (admin API and
one HTTP server on free 127.0.0.1 ports), a fresh database `jarvis_bench_<random>`, its own arq
queue, and the API, one worker and (with --upstreams lookup, the default) `jarvis-deploy resolver`
as subprocesses with JARVIS_UPSTREAM_MODE=loopback. The service
uses a Redis database number of its own (--redis-db, default 13), which must be empty at the start,
and JARVIS_HEARTBEAT_TIMEOUT=10, the minimum the service accepts.

It creates --projects projects, each with its own domain. Every project deploys its share of
--deployments blue-green deployments, alternating localhost:5000/jarvis-testapp:v2 and :v1, with a
random pause between two requests (so deployments of one project can queue up behind each other).
A steady load of GET /cgi-bin/version goes through Caddy to every project's domain for the whole
run. At random moments it injects faults:

- kill: SIGKILL to the worker's process group, then a new worker is started (--kills);
- stop: SIGTERM to the worker, which hands back what it runs and exits, then a new worker is started (--stops);
- flush: FLUSHDB on the run's Redis database only, which deletes every arq job and key (--flushes).

The moments, pauses and fault order come from --seed. After the last deployment has reached a final
state (or --wait-timeout ran out), the load keeps running for --settle seconds, so the reconciler
(every 30 s in the worker) has time to recover abandoned deployments and remove orphans. Then the
script prints the report: deployments requested, lost (no row), stuck (`queued` or `in_progress`),
final states, orphaned containers, requests through Caddy with non-2xx responses and connection
errors, and whether each project serves the image of its latest succeeded deployment.

It removes everything it created, also after Ctrl-C, SIGTERM or an error: the service processes,
the projects' containers, networks and volumes, Caddy, the run's Redis database (FLUSHDB of that
number only), the database and the temporary directory. All traffic goes to 127.0.0.1.

Usage, from the repository root, with PostgreSQL, Redis, the Docker Engine, Caddy and the test
images of scripts/test.sh in place:

    PYTHONPATH=src:. .venv/bin/python bench/soak.py --seed 1
"""

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import aiodocker
import asyncpg
import httpx
import redis.asyncio as redis

from bench.deploy_latency import (
    HEALTH_PATH,
    PROJECT_LABEL,
    BenchmarkError,
    BenchNames,
    ServiceProcesses,
    add_service_arguments,
    create_admin_token,
    create_project,
    drop_database,
    free_port,
    migrate_database,
    raise_keyboard_interrupt,
    read_log_tail,
    remove_docker_objects,
    service_environment,
    start_service,
    start_upstream_resolver,
    stop_services,
    wait_for_api,
    wait_for_worker,
)
from bench.zero_downtime import (
    CADDY_SERVER,
    EXPECTED_BODIES,
    VERSION_PATH,
    CaddyProcess,
    LoadGenerator,
    RequestResult,
    caddy_version,
    image_ref,
    jarvis_request,
)

REDIS_SERVER = os.environ.get("JARVIS_BENCH_REDIS_SERVER", "redis://127.0.0.1:6379")
# The service rejects a JARVIS_HEARTBEAT_TIMEOUT below 10 s.
HEARTBEAT_TIMEOUT = 10
# The worker's reconcile_state cron job runs at seconds 0 and 30 of every minute.
RECONCILE_PERIOD = 30
REPLICAS = 1
ACTIVE_STATES = {"queued", "in_progress"}
STATUS_POLL_INTERVAL = 0.5
VERSION_CHECK_ATTEMPTS = 3
LISTED_EVENTS = 12
# A stopped worker gets JARVIS_SHUTDOWN_GRACE_SECONDS, then undoes what it runs; this bounds both.
STOP_WAIT_SECONDS = 120


@dataclass(frozen=True)
class ProjectNames(BenchNames):
    """BenchNames of one soak project, so remove_docker_objects() removes that project's objects."""

    project_name: str = ""

    @property
    def project(self) -> str:
        return self.project_name


@dataclass
class SoakProject:
    name: str
    domain: str
    project_id: str = ""
    load: LoadGenerator | None = None


@dataclass
class Fault:
    """One injected fault: its kind, the number of deployment requests it waits for, and the extra delay in seconds.

    `done_at` is the wall-clock moment of the SIGKILL or the FLUSHDB, before a new worker starts.
    """

    kind: str
    after_requests: int
    delay: float
    done_at: float | None = None
    detail: str = ""


@dataclass
class SoakState:
    """Progress of the deployment requests: accepted deployment ids by project, and the requests that failed."""

    accepted: list[tuple[str, str]] = field(default_factory=list)
    request_errors: list[str] = field(default_factory=list)
    submitters_done: asyncio.Event = field(default_factory=asyncio.Event)
    requests_changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def requested(self) -> int:
        return len(self.accepted) + len(self.request_errors)


# --- faults ------------------------------------------------------------------------------------


def plan_faults(
    rng: random.Random, kills: int, flushes: int, deployments: int, max_delay: float, stops: int = 0
) -> list[Fault]:
    """Spread the faults over the run: each fires a random delay after a random deployment request."""
    kinds = ["kill"] * kills + ["flush"] * flushes + ["stop"] * stops
    rng.shuffle(kinds)
    # Request numbers 1 .. deployments-1, so every fault waits for at least one request and none for the last one.
    candidates = list(range(1, max(deployments, 2)))
    positions = sorted(rng.choice(candidates) for _ in kinds)
    return [Fault(kind, position, rng.uniform(0, max_delay)) for kind, position in zip(kinds, positions)]


def rotate_worker_log(services: ServiceProcesses, kill_number: int, ending: str = "killed") -> None:
    """Keep the ended worker's log as worker-<ending>-<n>.log, so the next worker starts a new worker.log."""
    current = services.log_path("worker")
    if current.exists():
        current.rename(services.log_path(f"worker-{ending}-{kill_number}"))


async def kill_and_restart_worker(
    services: ServiceProcesses, environment: dict[str, str], root: Path, kill_number: int
) -> str:
    worker = next(process for name, process in reversed(services.processes) if name == "worker")
    # start_service() gives the worker a session of its own, so its process group id is its pid.
    os.killpg(worker.pid, signal.SIGKILL)
    await asyncio.to_thread(worker.wait)
    rotate_worker_log(services, kill_number)
    start_service(services, "worker", ["worker"], environment, root)
    started = time.monotonic()
    # wait_for_worker() polls with time.sleep, so it runs in a thread to keep the load going.
    await asyncio.to_thread(wait_for_worker, services)
    new_pid = services.processes[-1][1].pid
    return f"killed pid {worker.pid}, new worker pid {new_pid} started in {time.monotonic() - started:.1f} s"


async def stop_and_restart_worker(
    services: ServiceProcesses, environment: dict[str, str], root: Path, stop_number: int
) -> str:
    """SIGTERM the worker, wait for it to exit on its own, and start a new one."""
    worker = next(process for name, process in reversed(services.processes) if name == "worker")
    sent = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    try:
        await asyncio.to_thread(worker.wait, STOP_WAIT_SECONDS)
        outcome = f"exited with {worker.returncode} {time.monotonic() - sent:.1f} s after SIGTERM"
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        await asyncio.to_thread(worker.wait)
        outcome = f"still running {STOP_WAIT_SECONDS} s after SIGTERM, so it got SIGKILL"
    rotate_worker_log(services, stop_number, "stopped")
    start_service(services, "worker", ["worker"], environment, root)
    await asyncio.to_thread(wait_for_worker, services)
    return f"pid {worker.pid} {outcome}; new worker pid {services.processes[-1][1].pid}"


async def flush_redis_database(redis_url: str) -> str:
    client = redis.from_url(redis_url)
    try:
        keys = await client.dbsize()
        await client.flushdb()
    finally:
        await client.aclose()
    return f"FLUSHDB deleted {keys} keys"


async def inject_faults(
    faults: list[Fault],
    state: SoakState,
    services: ServiceProcesses,
    environment: dict[str, str],
    arguments: argparse.Namespace,
    redis_url: str,
) -> None:
    kill_number = stop_number = 0
    for fault in faults:
        while state.requested < fault.after_requests and not state.submitters_done.is_set():
            state.requests_changed.clear()
            await state.requests_changed.wait()
        await asyncio.sleep(fault.delay)
        fault.done_at = time.time()
        if fault.kind == "kill":
            kill_number += 1
            fault.detail = await kill_and_restart_worker(services, environment, arguments.service_root, kill_number)
        elif fault.kind == "stop":
            stop_number += 1
            fault.detail = await stop_and_restart_worker(services, environment, arguments.service_root, stop_number)
        else:
            fault.detail = await flush_redis_database(redis_url)
        print(f"{clock(fault.done_at)} fault {fault.kind} after request {fault.after_requests}: {fault.detail}", flush=True)


# --- deployments -------------------------------------------------------------------------------


async def submit_deployments(
    client: httpx.AsyncClient,
    project: SoakProject,
    count: int,
    rng: random.Random,
    arguments: argparse.Namespace,
    state: SoakState,
) -> None:
    """Send `count` blue-green deployment requests for one project, with a random pause before each."""
    for number in range(count):
        await asyncio.sleep(rng.uniform(arguments.min_gap, arguments.max_gap))
        version = "v2" if number % 2 == 0 else "v1"
        request = jarvis_request(project.project_id, project.domain, "blue-green", version, arguments.interval)
        try:
            response = await client.post("/api/jarvis/deployments/deploy", json=request)
        except httpx.HTTPError as error:
            state.request_errors.append(f"{project.name} {version}: {type(error).__name__}: {error}")
        else:
            if response.status_code == 202:
                state.accepted.append((project.name, response.json()["id"]))
            else:
                state.request_errors.append(f"{project.name} {version}: {response.status_code} {response.text}")
        state.requests_changed.set()


async def fetch_deployments(connection: asyncpg.Connection) -> dict[str, asyncpg.Record]:
    rows = await connection.fetch(
        """
        SELECT d.id::text AS id, p.name AS project, d.version, d.status, d.image_ref, d.error
        FROM deployments d JOIN projects p ON p.id = d.project_id
        """
    )
    return {row["id"]: row for row in rows}


async def wait_until_final(connection: asyncpg.Connection, state: SoakState, timeout: float) -> float:
    """Wait until no accepted deployment is queued or in progress, or `timeout` seconds passed; return the wait."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        rows = await fetch_deployments(connection)
        active = [
            deployment_id
            for _, deployment_id in state.accepted
            if deployment_id not in rows or rows[deployment_id]["status"] in ACTIVE_STATES
        ]
        if not active:
            break
        await asyncio.sleep(STATUS_POLL_INTERVAL)
    return time.monotonic() - started


# --- report ------------------------------------------------------------------------------------


def clock(moment: float) -> str:
    return datetime.fromtimestamp(moment).astimezone().strftime("%H:%M:%S.%f")[:-3]


def image_tag(reference: str) -> str:
    return reference.rsplit(":", 1)[-1]


@dataclass
class ContainerCount:
    """Containers of the run's projects after the settle time."""

    total: int = 0
    not_succeeded: list[str] = field(default_factory=list)
    above_replicas: dict[str, int] = field(default_factory=dict)

    @property
    def orphaned(self) -> int:
        return len(self.not_succeeded) + sum(self.above_replicas.values())


async def count_containers(projects: list[SoakProject], rows: dict[str, asyncpg.Record]) -> ContainerCount:
    """Count containers that belong to no succeeded deployment, or exceed REPLICAS in a project."""
    succeeded = {deployment_id for deployment_id, row in rows.items() if row["status"] == "succeeded"}
    count = ContainerCount()
    async with aiodocker.Docker() as docker:
        for project in projects:
            containers = await docker.containers.list(all=True, filters={"label": [f"{PROJECT_LABEL}={project.name}"]})
            count.total += len(containers)
            serving = 0
            for container in containers:
                labels = container["Labels"] or {}
                deployment_id = labels.get("dev.jarvis-deploy.deployment", "")
                if deployment_id in succeeded:
                    serving += 1
                    continue
                names = ",".join(name.lstrip("/") for name in container["Names"])
                status = rows[deployment_id]["status"] if deployment_id in rows else "no row"
                count.not_succeeded.append(
                    f"{names} ({container['State']}, deployment {deployment_id or '-'} {status})"
                )
            if serving > REPLICAS:
                count.above_replicas[project.name] = serving - REPLICAS
    return count


async def served_version(caddy: CaddyProcess, domain: str) -> str:
    """GET the version through Caddy on new connections; return the last body, or the error."""
    last = "no response"
    async with httpx.AsyncClient(
        trust_env=False, timeout=5.0, limits=httpx.Limits(max_keepalive_connections=0)
    ) as probe:
        for _ in range(VERSION_CHECK_ATTEMPTS):
            try:
                response = await probe.get(f"http://127.0.0.1:{caddy.http_port}{VERSION_PATH}", headers={"Host": domain})
                last = response.text.strip() if response.status_code == 200 else f"status {response.status_code}"
                if response.status_code == 200:
                    return last
            except httpx.TransportError as error:
                last = type(error).__name__
            await asyncio.sleep(0.2)
    return last


@dataclass
class RequestCounts:
    sent: int = 0
    non_2xx: Counter = field(default_factory=Counter)
    errors_without_retry: Counter = field(default_factory=Counter)
    errors_after_retry: Counter = field(default_factory=Counter)
    retried: int = 0
    odd_bodies: Counter = field(default_factory=Counter)

    def add(self, result: RequestResult) -> None:
        """Count one request; the retry's outcome, when there was one, decides the status and the "after retry" lines."""
        self.sent += 1
        final = result.retry_outcome if result.retry_outcome is not None else result.outcome
        if result.retry_outcome is not None:
            self.retried += 1
        if not result.outcome.isdigit():
            self.errors_without_retry[result.outcome] += 1
        if not final.isdigit():
            self.errors_after_retry[final] += 1
        elif not final.startswith("2"):
            self.non_2xx[final] += 1
        elif result.body not in EXPECTED_BODIES:
            self.odd_bodies[result.body] += 1


def describe_failures(results: list[RequestResult], faults: list[Fault], switches: list[float]) -> list[str]:
    """List failed requests with their time, the nearest fault before them and the nearest route switch."""
    lines = []
    done = [fault for fault in faults if fault.done_at is not None]
    for result in sorted(results, key=lambda item: item.sent_at):
        final = result.retry_outcome if result.retry_outcome is not None else result.outcome
        if result.outcome.startswith("2") and result.body in EXPECTED_BODIES:
            continue
        before = [fault for fault in done if fault.done_at <= result.sent_at]
        nearest = f", {result.sent_at - before[-1].done_at:.1f} s after the {before[-1].kind}" if before else ""
        retry = f" -> retry {result.retry_outcome}" if result.retry_outcome is not None else ""
        if switches:
            switch = min(switches, key=lambda moment: abs(moment - result.sent_at))
            nearest += f", {(result.sent_at - switch) * 1000:+.0f} ms from the nearest `switched` event"
        lines.append(f"{clock(result.sent_at)} {result.outcome}{retry} (final {final}, body {result.body!r}){nearest}")
    return lines


async def print_report(
    connection: asyncpg.Connection,
    projects: list[SoakProject],
    state: SoakState,
    faults: list[Fault],
    caddy: CaddyProcess,
) -> None:
    rows = await fetch_deployments(connection)
    accepted_ids = [deployment_id for _, deployment_id in state.accepted]
    lost = [deployment_id for deployment_id in accepted_ids if deployment_id not in rows]
    stuck = [deployment_id for deployment_id in accepted_ids if deployment_id in rows and rows[deployment_id]["status"] in ACTIVE_STATES]
    statuses = Counter(rows[deployment_id]["status"] for deployment_id in accepted_ids if deployment_id in rows)
    containers = await count_containers(projects, rows)

    counts = RequestCounts()
    all_results: list[RequestResult] = []
    for project in projects:
        assert project.load is not None
        for result in project.load.results:
            counts.add(result)
        all_results.extend(project.load.results)

    print()
    print("=== soak report ===")
    print(f"deployments requested: {state.requested} (202 Accepted: {len(state.accepted)}, request errors: {len(state.request_errors)})")
    for error in state.request_errors:
        print(f"  request error: {error}")
    print(f"lost (accepted, no row): {len(lost)} {lost or ''}")
    print(f"stuck (queued or in_progress at the end): {len(stuck)}")
    for deployment_id in stuck:
        row = rows[deployment_id]
        print(f"  {row['project']} v{row['version']} {deployment_id}: {row['status']}")
    print(f"final states: {dict(sorted(statuses.items()))}")
    print(
        f"orphaned containers: {containers.orphaned} (of {containers.total} containers of the run's projects; "
        f"not of a succeeded deployment: {len(containers.not_succeeded)}, "
        f"above {REPLICAS} replica(s) per project: {sum(containers.above_replicas.values())})"
    )
    for line in containers.not_succeeded:
        print(f"  {line}")
    for project_name, extra in containers.above_replicas.items():
        print(f"  {project_name}: {extra} container(s) of its succeeded deployment above {REPLICAS}")

    print(f"requests sent through Caddy: {counts.sent}, {counts.retried} of them retried once on a closed kept-alive connection")
    print(f"non-2xx responses (after the retry, where one was sent): {sum(counts.non_2xx.values())} {dict(counts.non_2xx)}")
    print(f"connection errors without the retry: {sum(counts.errors_without_retry.values())} {dict(counts.errors_without_retry)}")
    print(f"connection errors after one retry: {sum(counts.errors_after_retry.values())} {dict(counts.errors_after_retry)}")
    print(f"2xx with a body other than v1 or v2: {sum(counts.odd_bodies.values())}")
    switch_rows = await connection.fetch("SELECT created_at FROM deployment_events WHERE stage = 'switched'")
    failures = describe_failures(all_results, faults, [row["created_at"].timestamp() for row in switch_rows])
    for line in failures[:40]:
        print(f"  {line}")
    if len(failures) > 40:
        print(f"  ... {len(failures) - 40} more")

    mismatched = 0
    print("served version against the latest succeeded deployment:")
    for project in projects:
        project_rows = [row for row in rows.values() if row["project"] == project.name and row["status"] == "succeeded"]
        latest = max(project_rows, key=lambda row: row["version"], default=None)
        expected = image_tag(latest["image_ref"]) if latest else "none succeeded"
        served = await served_version(caddy, project.domain)
        matches = latest is not None and served == expected
        mismatched += not matches
        version = f"v{latest['version']}" if latest else "-"
        print(f"  {project.name}: serves {served!r}, latest succeeded deployment {version} runs {expected!r}: {'match' if matches else 'MISMATCH'}")
    print(f"projects whose served version does not match: {mismatched}")

    print("faults:")
    for fault in faults:
        moment = clock(fault.done_at) if fault.done_at is not None else "not injected"
        print(f"  {moment} {fault.kind} (after request {fault.after_requests} + {fault.delay:.1f} s): {fault.detail}")

    unusual = [rows[deployment_id] for deployment_id in accepted_ids if deployment_id in rows and rows[deployment_id]["status"] not in {"succeeded", "superseded"}]
    if unusual:
        print("deployments that did not succeed, with their events:")
    for row in sorted(unusual, key=lambda item: (item["project"], item["version"])):
        print(f"  {row['project']} v{row['version']} {row['id']}: {row['status']}, error: {row['error']}")
        events = await connection.fetch(
            "SELECT stage, message, created_at FROM deployment_events WHERE deployment_id = $1::uuid ORDER BY id",
            row["id"],
        )
        for event in events[-LISTED_EVENTS:]:
            print(f"    {event['created_at'].astimezone().strftime('%H:%M:%S.%f')[:-3]} {event['stage']}: {event['message'][:160]}")


# --- the run -----------------------------------------------------------------------------------


async def soak(
    arguments: argparse.Namespace,
    names: BenchNames,
    projects: list[SoakProject],
    api_url: str,
    token: str,
    services: ServiceProcesses,
    caddy: CaddyProcess,
    environment: dict[str, str],
) -> None:
    # Inside the loop, SIGTERM cancels this task, so the load generators stop in order before the
    # cleanup in main() runs.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)

    rng = random.Random(arguments.seed)
    faults = plan_faults(
        rng, arguments.kills, arguments.flushes, arguments.deployments, arguments.max_fault_delay, arguments.stops
    )
    state = SoakState()
    headers = {"Authorization": f"Bearer {token}"}
    connection = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:5432/{names.database}")
    try:
        async with httpx.AsyncClient(base_url=api_url, trust_env=False, timeout=30.0, headers=headers) as client:
            await wait_for_api(services, client)
            for project in projects:
                project.project_id = await create_project(client, project.name)
                project.load = LoadGenerator(
                    f"http://127.0.0.1:{caddy.http_port}{VERSION_PATH}",
                    project.domain,
                    arguments.rps / len(projects),
                    arguments.clients,
                )
            # Each project's first deployment goes live before the load and the faults start, so
            # every request of the load has a version to reach.
            for project in projects:
                first = jarvis_request(project.project_id, project.domain, "blue-green", "v1", arguments.interval)
                response = await client.post("/api/jarvis/deployments/deploy", params={"wait": 120}, json=first)
                if response.status_code != 200 or response.json()["status"] != "succeeded":
                    raise BenchmarkError(f"first deployment of {project.name} failed: {response.status_code} {response.text}")
            print(f"{clock(time.time())} first deployments of v1 succeeded; starting the load and the soak", flush=True)

            for project in projects:
                assert project.load is not None
                project.load.start()
            try:
                shares = [arguments.deployments // len(projects) + (index < arguments.deployments % len(projects)) for index in range(len(projects))]
                submitters = [
                    submit_deployments(client, project, share, random.Random(rng.random()), arguments, state)
                    for project, share in zip(projects, shares)
                ]
                fault_task = asyncio.create_task(
                    inject_faults(faults, state, services, environment, arguments, environment["JARVIS_REDIS_URL"])
                )
                try:
                    await asyncio.gather(*submitters)
                finally:
                    state.submitters_done.set()
                    state.requests_changed.set()
                    await fault_task
                print(f"{clock(time.time())} all {state.requested} deployment requests sent and every fault injected", flush=True)

                waited = await wait_until_final(connection, state, arguments.wait_timeout)
                print(f"{clock(time.time())} waited {waited:.0f} s for final states; settling for {arguments.settle:g} s", flush=True)
                await asyncio.sleep(arguments.settle)
            finally:
                for project in projects:
                    assert project.load is not None
                    await project.load.stop()

        await print_report(connection, projects, state, faults, caddy)
    finally:
        await connection.close()


# --- cleanup -----------------------------------------------------------------------------------


async def remove_project_objects(names: BenchNames, projects: list[SoakProject]) -> None:
    """Remove every project's containers first, so no container keeps the shared proxy network in use."""
    async with aiodocker.Docker() as docker:
        for project in projects:
            for container in await docker.containers.list(all=True, filters={"label": [f"{PROJECT_LABEL}={project.name}"]}):
                await container.delete(force=True)
    for project in projects:
        await remove_docker_objects(ProjectNames(names.run_id, project.name))


async def flush_run_database(redis_url: str) -> None:
    client = redis.from_url(redis_url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()


def clean_up(
    names: BenchNames,
    projects: list[SoakProject],
    services: ServiceProcesses,
    caddy: CaddyProcess,
    redis_url: str,
    redis_checked: bool,
    work_dir: Path,
    keep_logs: bool,
) -> None:
    """Remove everything the run created. A failed step is reported, and the next one still runs."""
    steps = [
        ("stopping the API and the worker", lambda: stop_services(services)),
        ("removing Docker objects", lambda: asyncio.run(remove_project_objects(names, projects))),
        ("stopping Caddy", caddy.stop),
        (f"dropping database {names.database}", lambda: asyncio.run(drop_database(names.database))),
    ]
    # Only a database that was empty at the start belongs to this run.
    if redis_checked:
        steps.append((f"flushing Redis database {redis_url}", lambda: asyncio.run(flush_run_database(redis_url))))
    if keep_logs and caddy.log_path.exists():
        steps.append(("keeping the Caddy log", lambda: shutil.copy(caddy.log_path, services.log_dir)))
    steps.append(("removing the temporary directory", lambda: shutil.rmtree(work_dir)))
    for description, step in steps:
        try:
            step()
        except Exception as error:  # noqa: BLE001  (the remaining steps must still run)
            print(f"cleanup: {description} failed: {type(error).__name__}: {error}", file=sys.stderr)
    if keep_logs:
        print(f"service and Caddy logs kept in {services.log_dir}")


async def check_redis_database_empty(redis_url: str) -> None:
    client = redis.from_url(redis_url)
    try:
        keys = await client.dbsize()
    finally:
        await client.aclose()
    if keys:
        raise BenchmarkError(
            f"Redis database {redis_url} contains {keys} keys, and the soak flushes its database. "
            "Pick an empty database number with --redis-db"
        )


# --- command line ------------------------------------------------------------------------------


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run blue-green deployments under load through Caddy while killing the worker and flushing Redis.",
    )
    parser.add_argument("--deployments", type=int, default=40, help="deployment requests in total, after each project's first (default 40)")
    parser.add_argument("--projects", type=int, default=4, help="projects, each with its own domain (default 4)")
    parser.add_argument("--kills", type=int, default=4, help="times the worker gets SIGKILL and is started again (default 4)")
    parser.add_argument("--flushes", type=int, default=2, help="times the run's Redis database is flushed (default 2)")
    parser.add_argument(
        "--stops", type=int, default=2, help="times the worker gets SIGTERM, exits on its own and is started again (default 2)"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the pauses, fault moments and fault order (default 1)")
    parser.add_argument("--redis-db", type=int, default=13, help="Redis database number of the run; must be empty (default 13)")
    parser.add_argument("--rps", type=float, default=100.0, help="requests per second through Caddy, over all projects (default 100)")
    parser.add_argument("--clients", type=int, default=2, help="keep-alive connections per project (default 2)")
    parser.add_argument("--min-gap", type=float, default=0.5, help="minimum pause in seconds between two requests of a project (default 0.5)")
    parser.add_argument("--max-gap", type=float, default=8.0, help="maximum pause in seconds between two requests of a project (default 8)")
    parser.add_argument(
        "--max-fault-delay", type=float, default=4.0, help="a fault fires up to this many seconds after its deployment request (default 4)"
    )
    parser.add_argument("--watch-seconds", type=float, default=2.0, help="sets JARVIS_WATCH_SECONDS (default 2)")
    parser.add_argument("--drain-seconds", type=float, default=1.0, help="sets JARVIS_DRAIN_SECONDS (default 1)")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between two health probes (default 0.1, minimum 0.05)")
    parser.add_argument(
        "--wait-timeout",
        type=float,
        default=300.0,
        help="seconds to wait after the last request for every deployment to reach a final state (default 300)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=2 * RECONCILE_PERIOD + HEARTBEAT_TIMEOUT,
        help=f"seconds the load keeps running before the report, for the reconciler "
        f"(default {2 * RECONCILE_PERIOD + HEARTBEAT_TIMEOUT}: two reconcile periods plus the heartbeat timeout)",
    )
    parser.add_argument(
        "--upstreams",
        choices=("lookup", "list"),
        default="lookup",
        help=(
            "how Caddy finds the containers: `lookup` starts `jarvis-deploy resolver`, so a switch needs no Caddy "
            "reload; `list` changes the route's upstream list through the admin API, which reloads Caddy (default lookup)"
        ),
    )
    add_service_arguments(parser, "the API, worker and Caddy logs")

    arguments = parser.parse_args()
    for name in ("deployments", "projects", "clients"):
        if getattr(arguments, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(arguments, name)}")
    for name in ("kills", "flushes", "stops", "settle", "wait_timeout", "watch_seconds", "drain_seconds", "max_fault_delay"):
        if getattr(arguments, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(arguments, name)}")
    if not 0 <= arguments.min_gap <= arguments.max_gap:
        parser.error(f"--min-gap and --max-gap need 0 <= min <= max, got {arguments.min_gap} and {arguments.max_gap}")
    if not 0 <= arguments.redis_db <= 15:
        parser.error(f"--redis-db must be 0 to 15 (Redis' default number of databases), got {arguments.redis_db}")
    if arguments.rps <= 0:
        parser.error(f"--rps must be greater than 0, got {arguments.rps}")
    if arguments.interval < 0.05:
        parser.error(f"--interval must be at least 0.05 s, the service's minimum, got {arguments.interval}")
    arguments.service_root = arguments.service_root.resolve()
    if not (arguments.service_root / "src" / "jarvis_deploy" / "cli.py").is_file():
        parser.error(f"--service-root {arguments.service_root} has no src/jarvis_deploy/cli.py. Pass a jarvis-deploy checkout")
    # service_environment() of deploy_latency.py reads this option, which the soak does not offer.
    arguments.worker_poll_delay = None
    return arguments


def main() -> int:
    arguments = parse_arguments()
    names = BenchNames(secrets.token_hex(4))
    projects = [SoakProject(f"soak{names.run_id}p{index}", f"soak{names.run_id}p{index}.soak.test") for index in range(arguments.projects)]
    work_dir = Path(tempfile.mkdtemp(prefix="jarvis-bench-soak-"))
    keep_logs = arguments.log_dir is not None
    if keep_logs:
        arguments.log_dir.mkdir(parents=True, exist_ok=True)
    services = ServiceProcesses(arguments.log_dir if keep_logs else work_dir)
    caddy = CaddyProcess(work_dir)
    redis_url = f"{REDIS_SERVER}/{arguments.redis_db}"
    redis_checked = False

    environment = service_environment(names, arguments)
    settings = {
        "JARVIS_REDIS_URL": redis_url,
        "JARVIS_CADDY_ADMIN_URL": caddy.admin_url,
        "JARVIS_CADDY_SERVER": CADDY_SERVER,
        "JARVIS_CADDY_LISTEN": json.dumps([f"127.0.0.1:{caddy.http_port}"]),
        "JARVIS_UPSTREAM_MODE": "loopback",
        "JARVIS_WATCH_SECONDS": f"{arguments.watch_seconds:g}",
        "JARVIS_DRAIN_SECONDS": f"{arguments.drain_seconds:g}",
        "JARVIS_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
    }
    environment.update(settings)
    # Without it, a killed worker loses the last few kilobytes of its log in the stdout buffer.
    environment["PYTHONUNBUFFERED"] = "1"

    # Outside asyncio.run, SIGTERM raises KeyboardInterrupt like Ctrl-C does, so the cleanup below runs.
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)

    print(f"soak id {names.run_id}: database {names.database}, queue {names.queue}, Redis {redis_url}, seed {arguments.seed}")
    print(f"Caddy {caddy_version()}: admin {caddy.admin_url}, HTTP 127.0.0.1:{caddy.http_port}")
    print(
        f"{arguments.deployments} blue-green deployments over {arguments.projects} projects ({image_ref('v2')} and :v1), "
        f"{arguments.kills} worker kills, {arguments.stops} worker stops, {arguments.flushes} Redis flushes; load {arguments.rps:g} requests/s over "
        f"{arguments.clients} keep-alive connection(s) per project, GET {VERSION_PATH}; health check {HEALTH_PATH} "
        f"every {arguments.interval:g} s"
    )
    for key, value in settings.items():
        print(f"  {key}={value}")
    sys.stdout.flush()

    try:
        asyncio.run(check_redis_database_empty(redis_url))
        redis_checked = True
        caddy.start()
        root = arguments.service_root
        migrate_database(environment, root)
        token = create_admin_token(environment, root, f"soak-{names.run_id}")
        if arguments.upstreams == "lookup":
            print(f"  JARVIS_UPSTREAM_RESOLVER={start_upstream_resolver(services, environment, root)}", flush=True)
        start_service(services, "worker", ["worker"], environment, root)
        wait_for_worker(services)
        api_port = free_port()
        start_service(services, "api", ["api", "--host", "127.0.0.1", "--port", str(api_port)], environment, root)
        asyncio.run(soak(arguments, names, projects, f"http://127.0.0.1:{api_port}", token, services, caddy, environment))
        return 0
    except BenchmarkError as error:
        print(f"soak failed: {error}", file=sys.stderr)
        for name, _ in services.processes[-2:]:
            print(f"--- last lines of the {name} log ---\n{read_log_tail(services.log_path(name))}", file=sys.stderr)
        print(f"--- last lines of the Caddy log ---\n{read_log_tail(caddy.log_path)}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted, cleaning up", file=sys.stderr)
        return 130
    finally:
        # asyncio.run resets SIGTERM to the default action when its loop closes.
        signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
        clean_up(names, projects, services, caddy, redis_url, redis_checked, work_dir, keep_logs)


if __name__ == "__main__":
    sys.exit(main())

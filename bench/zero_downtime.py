"""Measure what clients see through Caddy while a project is deployed again and again.

The script starts its own Caddy 2.6 (admin API and one HTTP server on free 127.0.0.1 ports, from a
config file in a temporary directory), its own database `jarvis_bench_<random>` and arq queue, and
the API and one worker as subprocesses, with JARVIS_UPSTREAM_MODE=loopback so that Caddy dials the
containers' published loopback ports. With --upstreams lookup (the default) it also runs
`jarvis-deploy resolver` and sets JARVIS_UPSTREAM_RESOLVER, so that Caddy finds the containers by
a lookup and a switch does not reload Caddy; --upstreams list switches through the admin API
instead. Then it runs three scenarios. In each, a steady load of
GET /cgi-bin/version requests goes through Caddy, --rps in total over --clients keep-alive
connections, with the Host header set to the scenario's domain. Meanwhile --deployments deployments
run one after the other, alternating the images v2 and v1:

- blue-green: POST /api/jarvis/deployments/deploy with a domain and strategy `blue-green`;
- recreate: the same project and domain with strategy `recreate`;
- compose: `docker-compose -p <random> -f FILE up -d` after changing the image tag in FILE, for one
  service published on a fixed 127.0.0.1 port, with a Caddy route (added once through the admin API,
  with the reverse_proxy settings jarvis-deploy uses) pointing at that port.

Each scenario starts with one deployment of v1 before the load starts, so every measured deployment
replaces a live version of the same kind. Per scenario, the script prints the requests sent, their
statuses and connection errors, and the requests retried once because the server closed a
kept-alive connection without a response, which do not count as successes. It lists the first 40
failed requests with their times relative to the deployment's events, and prints the medians of
the deployments' timings.

It removes everything it created, also after Ctrl-C, SIGTERM or an error: the service processes,
the project's containers, networks and volumes, the compose project, Caddy, the Redis keys, the
database and the temporary directory. All traffic goes to 127.0.0.1.

Usage, from the repository root, with PostgreSQL, Redis, the Docker Engine, Caddy, docker-compose and
the test images of scripts/test.sh in place:

    PYTHONPATH=src:. .venv/bin/python bench/zero_downtime.py
"""

import argparse
import asyncio
import json
import os
import re
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import aiodocker
import httpx

from bench.deploy_latency import (
    APP_PORT,
    BASELINE_LABEL,
    FINAL_STATES,
    HEALTH_PATH,
    STATUS_POLL_INTERVAL,
    BenchmarkError,
    BenchNames,
    JarvisSample,
    ServiceProcesses,
    add_service_arguments,
    create_admin_token,
    create_project,
    delete_queue_keys,
    drop_database,
    free_port,
    migrate_database,
    parse_timestamp,
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
from jarvis_deploy.proxy.caddy import build_route

IMAGE_REPOSITORY = os.environ.get("JARVIS_BENCH_REPOSITORY", "localhost:5000/jarvis-testapp")
VERSION_PATH = "/cgi-bin/version"
CADDY_SERVER = "jarvis-bench"
CADDY_START_TIMEOUT = 15.0
CADDY_STOP_TIMEOUT = 10.0
FALLBACK_STATUS = 404
COMPOSE_SERVICE = "app"
COMPOSE_LABEL = "com.docker.compose.project"
# A request that takes longer than this counts as a ReadTimeout error. Caddy itself gives up on an
# unreachable upstream after the route's try_duration of 5 s and returns 502.
REQUEST_TIMEOUT = 10.0
# Failed requests printed one by one per scenario; the rest only go into the counts.
MAX_LISTED_FAILURES = 40
SLOWEST_LISTED = 5
EXPECTED_BODIES = {"v1", "v2"}
SCENARIOS = ("blue-green", "recreate", "compose")
# Errors that mean the server closed a connection that had already carried a response, without
# sending a response to the request on it. RFC 9112, section 9.3.1, lets a client send an idempotent
# request again on a new connection in that case.
CLOSED_CONNECTION_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


# --- load through Caddy ------------------------------------------------------------------------


@dataclass
class RequestResult:
    """One request of the load. `sent_at` is wall-clock time (seconds since the epoch), like event times.

    `outcome` is the HTTP status as a string, or the exception's class name when no response came.
    When the first attempt failed on a closed kept-alive connection and was sent again, `outcome`
    is that first failure and `retry_outcome` is the result of the second attempt.
    """

    sent_at: float
    seconds: float
    outcome: str
    body: str = ""
    retry_outcome: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.outcome.startswith("2") and self.retry_outcome is None


@dataclass
class LoadGenerator:
    """Sends GET requests through Caddy at a fixed total rate from `clients` keep-alive connections.

    Each client sends on its own schedule of rps/clients requests per second. A client whose
    request took longer than its interval skips the slots it missed instead of sending a burst.
    """

    url: str
    host: str
    rps: float
    clients: int
    results: list[RequestResult] = field(default_factory=list)
    skipped_slots: int = 0
    started_at: float = 0.0
    stopped_at: float = 0.0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task] = field(default_factory=list)

    def start(self) -> None:
        self.started_at = time.time()
        self._tasks = [asyncio.create_task(self._run_client(index)) for index in range(self.clients)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.stopped_at = time.time()

    async def _run_client(self, index: int) -> None:
        interval = self.clients / self.rps
        loop = asyncio.get_running_loop()
        next_send = loop.time() + interval * index / self.clients
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(trust_env=False, timeout=REQUEST_TIMEOUT, limits=limits) as http:
            connection_reused = False
            while not self._stop.is_set():
                delay = next_send - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_send += interval
                now = loop.time()
                if next_send < now:
                    missed = int((now - next_send) / interval) + 1
                    self.skipped_slots += missed
                    next_send += missed * interval
                result, connection_reused = await self._send(http, connection_reused)
                self.results.append(result)

    async def _send(self, http: httpx.AsyncClient, connection_reused: bool) -> tuple[RequestResult, bool]:
        """Send one request; return its result and whether the client's connection stays open for the next one."""
        sent_at = time.time()
        started = time.perf_counter()
        try:
            response = await http.get(self.url, headers={"Host": self.host})
        except CLOSED_CONNECTION_ERRORS as error:
            if not connection_reused:
                return RequestResult(sent_at, time.perf_counter() - started, type(error).__name__), False
            # The kept-alive connection was closed under the request; send it once more on a new one.
            retry_outcome, body, keep_alive = await self._retry(http)
            result = RequestResult(sent_at, time.perf_counter() - started, type(error).__name__, body, retry_outcome)
            return result, keep_alive
        except httpx.HTTPError as error:
            return RequestResult(sent_at, time.perf_counter() - started, type(error).__name__), False

        keep_alive = response.headers.get("connection", "").lower() != "close"
        result = RequestResult(sent_at, time.perf_counter() - started, str(response.status_code), response.text.strip())
        return result, keep_alive

    async def _retry(self, http: httpx.AsyncClient) -> tuple[str, str, bool]:
        try:
            response = await http.get(self.url, headers={"Host": self.host})
        except httpx.HTTPError as error:
            return type(error).__name__, "", False
        keep_alive = response.headers.get("connection", "").lower() != "close"
        return str(response.status_code), response.text.strip(), keep_alive


# --- Caddy -------------------------------------------------------------------------------------


@dataclass
class CaddyProcess:
    """A private `caddy run --config FILE` with its admin API and one HTTP server on loopback ports."""

    directory: Path
    admin_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def log_path(self) -> Path:
        return self.directory / "caddy.log"

    def config(self) -> dict:
        # No TLS and no automatic HTTPS, so Caddy requests no certificate. A request for an unknown
        # host gets FALLBACK_STATUS, so a missing route shows up as a non-2xx status.
        fallback = {"handle": [{"handler": "static_response", "status_code": FALLBACK_STATUS}]}
        server = {
            "listen": [f"127.0.0.1:{self.http_port}"],
            "automatic_https": {"disable": True},
            "routes": [fallback],
        }
        return {
            "admin": {"listen": f"127.0.0.1:{self.admin_port}", "config": {"persist": False}},
            "apps": {"http": {"servers": {CADDY_SERVER: server}}},
        }

    def start(self) -> None:
        executable = shutil.which("caddy")
        if executable is None:
            raise BenchmarkError("caddy is not on PATH. Install Caddy 2.6 or later (Debian package `caddy`)")
        config_path = self.directory / "caddy.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        # Caddy keeps its data and autosaves under the XDG directories, so they go to the temporary directory.
        environment = {
            **os.environ,
            "XDG_CONFIG_HOME": str(self.directory / "xdg-config"),
            "XDG_DATA_HOME": str(self.directory / "xdg-data"),
        }
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [executable, "run", "--config", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                cwd=self.directory,
                start_new_session=True,
            )
        self._wait_until_ready()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=CADDY_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _wait_until_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + CADDY_START_TIMEOUT
        with httpx.Client(trust_env=False, timeout=1.0) as client:
            while True:
                if self.process.poll() is not None:
                    raise BenchmarkError(
                        f"caddy exited with code {self.process.returncode} during start:\n{read_log_tail(self.log_path)}"
                    )
                try:
                    admin_ready = client.get(f"{self.admin_url}/config/").status_code == 200
                    # Any response from the HTTP server means its listener is up.
                    client.get(f"http://127.0.0.1:{self.http_port}/")
                    if admin_ready:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise BenchmarkError(
                        f"caddy did not become ready within {CADDY_START_TIMEOUT:g} s:\n{read_log_tail(self.log_path)}"
                    )
                time.sleep(0.05)


def caddy_version() -> str:
    result = subprocess.run(["caddy", "version"], capture_output=True, text=True)
    return result.stdout.strip().split()[0] if result.returncode == 0 and result.stdout.strip() else "unknown"


async def add_caddy_route(admin_url: str, route: dict) -> None:
    """Insert `route` first in the benchmark server's routes, so the fallback route does not shadow it."""
    async with httpx.AsyncClient(base_url=admin_url, trust_env=False, timeout=10.0) as admin:
        response = await admin.put(f"/config/apps/http/servers/{CADDY_SERVER}/routes/0", json=route)
    if response.status_code != 200:
        raise BenchmarkError(f"adding route {route.get('@id')} to Caddy failed: {response.status_code} {response.text}")


# --- deployments -------------------------------------------------------------------------------


@dataclass
class DeploymentRecord:
    """One measured deployment: its wall-clock window, its events as (stage, time), and its timings in ms."""

    number: int
    version: str
    started_at: float
    ended_at: float
    events: list[tuple[str, float]]
    total_ms: float
    health_ms: float | None = None
    healthy_to_switched_ms: float | None = None
    switched_message_ms: float | None = None
    switch_duration_ms: float | None = None
    up_ms: float | None = None
    serving_ms: float | None = None


def image_ref(version: str) -> str:
    return f"{IMAGE_REPOSITORY}:{version}"


def deployment_versions(count: int) -> list[str]:
    """Return v2, v1, v2, ...: each measured deployment changes the version that the warm-up left live (v1)."""
    return ["v2" if number % 2 == 0 else "v1" for number in range(count)]


def jarvis_request(project_id: str, domain: str, strategy: str, version: str, interval: float) -> dict:
    return {
        "project_id": project_id,
        "image_ref": image_ref(version),
        "port": APP_PORT,
        "domain": domain,
        "strategy": strategy,
        "healthcheck": {"type": "http", "path": HEALTH_PATH, "interval": interval},
    }


# Seconds during which a GET of a just-accepted deployment may return 404. The API's session
# dependency commits after `yield`, and FastAPI 0.165 runs that code after sending the response, so
# a client can read before the row is committed.
NOT_YET_VISIBLE_SECONDS = 5.0


async def deploy_and_wait(
    client: httpx.AsyncClient, request: dict, timeout: float, deployment_ids: list[str], early_not_found: Counter
) -> JarvisSample:
    """Deploy once and poll the deployment every 20 ms until it reads `succeeded`.

    A 404 within NOT_YET_VISIBLE_SECONDS of the 202 is counted in `early_not_found` and polled again.
    """
    sent_at = datetime.now().astimezone()
    started = time.perf_counter()
    response = await client.post("/api/jarvis/deployments/deploy", json=request)
    post_seconds = time.perf_counter() - started
    if response.status_code != 202:
        raise BenchmarkError(f"POST /api/jarvis/deployments/deploy failed: {response.status_code} {response.text}")
    deployment_id = response.json()["id"]
    deployment_ids.append(deployment_id)

    while True:
        poll_started = time.perf_counter()
        response = await client.get(f"/api/jarvis/deployments/{deployment_id}")
        if response.status_code == 404 and poll_started - started - post_seconds < NOT_YET_VISIBLE_SECONDS:
            early_not_found["GET after 202 returned 404"] += 1
            await asyncio.sleep(STATUS_POLL_INTERVAL)
            continue
        if response.status_code != 200:
            raise BenchmarkError(f"GET deployment {deployment_id} failed: {response.status_code} {response.text}")
        deployment = response.json()
        if deployment["status"] == "succeeded":
            seconds = time.perf_counter() - started
            return JarvisSample(seconds, post_seconds, sent_at, datetime.now().astimezone(), deployment)
        if deployment["status"] in FINAL_STATES:
            raise BenchmarkError(
                f"deployment {deployment_id} ended {deployment['status']}: {deployment.get('error')}. "
                f"Events: {deployment.get('events')}"
            )
        if time.perf_counter() - started > timeout:
            raise BenchmarkError(
                f"deployment {deployment_id} timed out after {timeout:g} s in state {deployment['status']}. "
                f"Events: {deployment.get('events')}"
            )
        await asyncio.sleep(max(0.0, STATUS_POLL_INTERVAL - (time.perf_counter() - poll_started)))


SINCE_HEALTHY = re.compile(r"\((\d+(?:\.\d+)?) ms after healthy\)")


def jarvis_record(number: int, version: str, sample: JarvisSample) -> DeploymentRecord:
    """Collect the timings of one jarvis deployment from its events."""
    events = [
        (event["stage"], parse_timestamp(event["created_at"]).timestamp())
        for event in sample.deployment.get("events", [])
    ]
    record = DeploymentRecord(
        number=number,
        version=version,
        started_at=sample.sent_at.timestamp(),
        ended_at=sample.seen_at.timestamp(),
        events=[("POST sent", sample.sent_at.timestamp()), *events, ("poll saw succeeded", sample.seen_at.timestamp())],
        total_ms=sample.seconds * 1000,
    )

    healthy = [event for event in sample.deployment.get("events", []) if event["stage"] == "healthy"]
    switched = [event for event in sample.deployment.get("events", []) if event["stage"] == "switched"]
    if healthy and healthy[-1].get("duration_ms") is not None:
        record.health_ms = float(healthy[-1]["duration_ms"])
    if healthy and switched:
        gap = parse_timestamp(switched[0]["created_at"]) - parse_timestamp(healthy[-1]["created_at"])
        record.healthy_to_switched_ms = gap.total_seconds() * 1000
    if switched:
        match = SINCE_HEALTHY.search(switched[0].get("message") or "")
        if match:
            record.switched_message_ms = float(match.group(1))
        if switched[0].get("duration_ms") is not None:
            record.switch_duration_ms = float(switched[0]["duration_ms"])
    return record


async def wait_for_version(url: str, version: str, timeout: float) -> None:
    """Poll `url` on new connections until it returns `version`, as the compose scenario's readiness check."""
    deadline = time.monotonic() + timeout
    last = "no response"
    async with httpx.AsyncClient(
        trust_env=False, timeout=2.0, limits=httpx.Limits(max_keepalive_connections=0)
    ) as probe:
        while time.monotonic() < deadline:
            try:
                response = await probe.get(url)
                if response.status_code == 200 and response.text.strip() == version:
                    return
                last = f"{response.status_code} {response.text.strip()!r}"
            except httpx.TransportError as error:
                last = type(error).__name__
            await asyncio.sleep(0.02)
    raise BenchmarkError(f"{url} did not return {version!r} within {timeout:g} s. Last response: {last}")


@dataclass
class ComposeProject:
    """A one-service compose project on a fixed loopback port, changed by rewriting its image tag."""

    name: str
    directory: Path
    host_port: int
    run_id: str

    @property
    def file(self) -> Path:
        return self.directory / "docker-compose.yml"

    def write(self, version: str) -> None:
        # The bench label lets the cleanup remove the container even when `docker-compose down` fails.
        self.file.write_text(
            f"""services:
  {COMPOSE_SERVICE}:
    image: {image_ref(version)}
    ports: ["127.0.0.1:{self.host_port}:{APP_PORT}"]
    labels:
      {BASELINE_LABEL}: "{self.run_id}"
"""
        )

    async def run(self, *arguments: str) -> None:
        process = await asyncio.create_subprocess_exec(
            "docker-compose", "-p", self.name, "-f", str(self.file), *arguments,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await process.communicate()
        if process.returncode != 0:
            raise BenchmarkError(
                f"`docker-compose -p {self.name} {' '.join(arguments)}` failed with exit code "
                f"{process.returncode}: {output.decode(errors='replace').strip()}"
            )

    def down(self) -> None:
        if not self.file.exists():
            return
        subprocess.run(
            ["docker-compose", "-p", self.name, "-f", str(self.file), "down", "--volumes", "--remove-orphans"],
            check=True, capture_output=True, text=True,
        )


async def compose_deployment(compose: ComposeProject, number: int, version: str, timeout: float) -> DeploymentRecord:
    compose.write(version)
    started_at = time.time()
    started = time.perf_counter()
    await compose.run("up", "-d")
    up_returned_at = time.time()
    up_ms = (time.perf_counter() - started) * 1000
    await wait_for_version(f"http://127.0.0.1:{compose.host_port}{VERSION_PATH}", version, timeout)
    serving_at = time.time()
    return DeploymentRecord(
        number=number,
        version=version,
        started_at=started_at,
        ended_at=serving_at,
        events=[("up -d started", started_at), ("up -d returned", up_returned_at), ("new version answered", serving_at)],
        total_ms=(serving_at - started_at) * 1000,
        up_ms=up_ms,
        serving_ms=(serving_at - up_returned_at) * 1000,
    )


# --- report ------------------------------------------------------------------------------------


@dataclass
class ScenarioResult:
    name: str
    load: LoadGenerator
    deployments: list[DeploymentRecord]
    cpu_seconds: float
    load_average: float


def locate(moment: float, deployments: list[DeploymentRecord]) -> str:
    """Describe `moment` relative to the nearest events of the deployment it falls in (or the nearest one)."""
    if not deployments:
        return "no deployment"
    inside = [record for record in deployments if record.started_at <= moment <= record.ended_at]
    record = inside[0] if inside else min(
        deployments, key=lambda item: min(abs(moment - item.started_at), abs(moment - item.ended_at))
    )
    before = [(stage, at) for stage, at in record.events if at <= moment]
    after = [(stage, at) for stage, at in record.events if at > moment]
    parts = []
    if before:
        stage, at = before[-1]
        parts.append(f"{(moment - at) * 1000:.0f} ms after {stage}")
    if after:
        stage, at = after[0]
        parts.append(f"{(at - moment) * 1000:.0f} ms before {stage}")
    where = "during" if inside else "outside"
    return f"{where} deployment {record.number} ({record.version}): {', '.join(parts)}"


def median_text(values: list[float | None], unit: str = "ms") -> str:
    present = [value for value in values if value is not None]
    if not present:
        return "n/a"
    return f"{statistics.median(present):.1f} {unit} (min {min(present):.1f}, max {max(present):.1f}, n={len(present)})"


def print_scenario(result: ScenarioResult) -> None:
    load = result.load
    results = load.results
    seconds = max(load.stopped_at - load.started_at, 1e-9)
    first_statuses = Counter(item.outcome for item in results if item.outcome.isdigit())
    two_xx = sum(count for status, count in first_statuses.items() if status.startswith("2"))
    non_2xx = Counter({status: count for status, count in first_statuses.items() if not status.startswith("2")})
    retried = [item for item in results if item.retry_outcome is not None]
    connection_errors = Counter(
        item.outcome for item in results if not item.outcome.isdigit() and item.retry_outcome is None
    )
    retry_outcomes = Counter(item.retry_outcome for item in retried)
    retry_successes = sum(count for outcome, count in retry_outcomes.items() if outcome.startswith("2"))
    errors_without_retry = sum(non_2xx.values()) + sum(connection_errors.values()) + len(retried)
    errors_after_retry = errors_without_retry - retry_successes
    latencies = sorted(item.seconds * 1000 for item in results)

    print()
    print(f"=== {result.name} ===")
    print(
        f"requests sent: {len(results)} in {seconds:.1f} s ({len(results) / seconds:.1f}/s), "
        f"skipped slots: {load.skipped_slots}"
    )
    print(f"2xx at the first attempt: {two_xx}")
    print(f"non-2xx: {sum(non_2xx.values())} {dict(sorted(non_2xx.items()))}")
    print(f"connection errors (no retry allowed): {sum(connection_errors.values())} {dict(connection_errors)}")
    print(
        f"closed kept-alive connection without a response, retried once: {len(retried)} "
        f"by first error {dict(Counter(item.outcome for item in retried))}, retry outcomes {dict(retry_outcomes)}"
    )
    print(f"errors without retry: {errors_without_retry}; errors after one retry: {errors_after_retry}")
    if latencies:
        p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        print(
            f"latency: median {statistics.median(latencies):.1f} ms, p99 {p99:.1f} ms, max {latencies[-1]:.1f} ms"
        )
    versions = Counter(item.body for item in results if item.succeeded)
    print(f"response bodies of 2xx: {dict(versions)}")
    odd_bodies = [item for item in results if item.succeeded and item.body not in EXPECTED_BODIES]
    print(f"2xx with a body other than v1 or v2: {len(odd_bodies)}")
    print(
        f"CPU time of this script's process (load generator and API polls): {result.cpu_seconds:.1f} s; "
        f"1-minute load average at the end: {result.load_average:.2f}"
    )

    deployments = result.deployments
    print(f"deployments: {len(deployments)}")
    if result.name == "compose":
        medians = [
            ("`up -d` wall time", [record.up_ms for record in deployments]),
            ("`up -d` returned -> new version answered", [record.serving_ms for record in deployments]),
            ("`up -d` started -> new version answered", [record.total_ms for record in deployments]),
        ]
    else:
        medians = [
            ("healthy -> switched (event times)", [record.healthy_to_switched_ms for record in deployments]),
            ("'ms after healthy' in the switched message", [record.switched_message_ms for record in deployments]),
            (
                "switched duration_ms (route row upsert, then the PATCH to Caddy or the resolver check and refresh wait)",
                [record.switch_duration_ms for record in deployments],
            ),
            ("POST -> succeeded", [record.total_ms for record in deployments]),
            ("health check (healthy duration_ms)", [record.health_ms for record in deployments]),
        ]
    for label, values in medians:
        print(f"  median {label}: {median_text(values)}")

    failures = [item for item in results if not item.succeeded or item.body not in EXPECTED_BODIES]
    failures.sort(key=lambda item: item.sent_at)
    if failures:
        print(f"failed, retried or odd requests ({len(failures)}), relative to the deployments' events:")
        for item in failures[:MAX_LISTED_FAILURES]:
            print(f"  {describe_request(item)}, sent {locate(item.sent_at, deployments)}")
        if len(failures) > MAX_LISTED_FAILURES:
            print(f"  ... {len(failures) - MAX_LISTED_FAILURES} more")
    print(f"slowest {SLOWEST_LISTED} requests:")
    for item in sorted(results, key=lambda item: item.seconds, reverse=True)[:SLOWEST_LISTED]:
        print(f"  {describe_request(item)}, sent {locate(item.sent_at, deployments)}")


def describe_request(item: RequestResult) -> str:
    stamp = datetime.fromtimestamp(item.sent_at).astimezone().strftime("%H:%M:%S.%f")[:-3]
    retry = f" -> retry {item.retry_outcome}" if item.retry_outcome is not None else ""
    body = f" body {item.body!r}" if item.body not in EXPECTED_BODIES else ""
    return f"{stamp} {item.outcome}{retry}{body} after {item.seconds * 1000:.0f} ms"


def process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- the benchmark -----------------------------------------------------------------------------


async def run_jarvis_scenario(
    client: httpx.AsyncClient,
    arguments: argparse.Namespace,
    caddy: CaddyProcess,
    project_id: str,
    domain: str,
    strategy: str,
    deployment_ids: list[str],
) -> ScenarioResult:
    warmup = jarvis_request(project_id, domain, strategy, "v1", arguments.interval)
    early_not_found: Counter = Counter()
    await deploy_and_wait(client, warmup, arguments.timeout, deployment_ids, early_not_found)
    print(f"{strategy}: warm-up deployment of v1 succeeded, starting the load", flush=True)

    load = LoadGenerator(f"http://127.0.0.1:{caddy.http_port}{VERSION_PATH}", domain, arguments.rps, arguments.clients)
    records = []
    cpu_before = process_cpu_seconds()
    load.start()
    try:
        for number, version in enumerate(deployment_versions(arguments.deployments), start=1):
            request = jarvis_request(project_id, domain, strategy, version, arguments.interval)
            sample = await deploy_and_wait(client, request, arguments.timeout, deployment_ids, early_not_found)
            record = jarvis_record(number, version, sample)
            records.append(record)
            print(
                f"{strategy} {number:>3} {version}: {record.total_ms:7.0f} ms, "
                f"healthy -> switched {record.healthy_to_switched_ms or float('nan'):.1f} ms",
                flush=True,
            )
        await asyncio.sleep(arguments.tail)
    finally:
        await load.stop()
    if early_not_found:
        print(f"{strategy}: the API returned 404 for a just-accepted deployment {sum(early_not_found.values())} times")
    return ScenarioResult(strategy, load, records, process_cpu_seconds() - cpu_before, os.getloadavg()[0])


async def run_compose_scenario(arguments: argparse.Namespace, caddy: CaddyProcess, compose: ComposeProject) -> ScenarioResult:
    domain = f"{compose.name}.bench.test"
    compose.write("v1")
    await compose.run("up", "-d")
    await wait_for_version(f"http://127.0.0.1:{compose.host_port}{VERSION_PATH}", "v1", arguments.timeout)
    route = build_route(f"jarvis-bench-compose-{compose.run_id}", [domain], [f"127.0.0.1:{compose.host_port}"])
    await add_caddy_route(caddy.admin_url, route)
    # Let Caddy finish the reload that the route change started before the load begins.
    await asyncio.sleep(1.0)
    print(f"compose: v1 answers on 127.0.0.1:{compose.host_port}, Caddy route added, starting the load", flush=True)

    load = LoadGenerator(f"http://127.0.0.1:{caddy.http_port}{VERSION_PATH}", domain, arguments.rps, arguments.clients)
    records = []
    cpu_before = process_cpu_seconds()
    load.start()
    try:
        for number, version in enumerate(deployment_versions(arguments.deployments), start=1):
            record = await compose_deployment(compose, number, version, arguments.timeout)
            records.append(record)
            print(
                f"compose {number:>3} {version}: up -d {record.up_ms:7.0f} ms, answered "
                f"{record.serving_ms:6.0f} ms later",
                flush=True,
            )
        await asyncio.sleep(arguments.tail)
    finally:
        await load.stop()
    return ScenarioResult("compose", load, records, process_cpu_seconds() - cpu_before, os.getloadavg()[0])


async def benchmark(
    arguments: argparse.Namespace,
    names: BenchNames,
    api_url: str,
    token: str,
    services: ServiceProcesses,
    caddy: CaddyProcess,
    compose: ComposeProject,
    deployment_ids: list[str],
) -> None:
    # Inside the loop, SIGTERM cancels this task, so the load generator and its connections stop in
    # order before the cleanup in main() runs.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)

    domain = f"{names.project}.bench.test"
    results = []
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=api_url, trust_env=False, timeout=30.0, headers=headers) as client:
        await wait_for_api(services, client)
        project_id = await create_project(client, names.project)
        print(f"project {names.project}, domain {domain}, Caddy HTTP 127.0.0.1:{caddy.http_port}", flush=True)
        for strategy in ("blue-green", "recreate"):
            if strategy in arguments.scenarios:
                results.append(
                    await run_jarvis_scenario(client, arguments, caddy, project_id, domain, strategy, deployment_ids)
                )
    if "compose" in arguments.scenarios:
        results.append(await run_compose_scenario(arguments, caddy, compose))

    for result in results:
        print_scenario(result)


# --- cleanup -----------------------------------------------------------------------------------


async def remove_compose_networks(project: str) -> None:
    """Remove networks left by the compose project when `docker-compose down` did not."""
    async with aiodocker.Docker() as docker:
        for network in await docker.networks.list(filters={"label": [f"{COMPOSE_LABEL}={project}"]}):
            await (await docker.networks.get(network["Id"])).delete()


def clean_up(
    names: BenchNames,
    services: ServiceProcesses,
    caddy: CaddyProcess,
    compose: ComposeProject,
    deployment_ids: list[str],
    work_dir: Path,
    keep_logs: bool,
) -> None:
    """Remove everything the benchmark created. A failed step is reported, and the next one still runs."""
    steps = [
        ("stopping the API and the worker", lambda: stop_services(services)),
        (f"docker-compose down of {compose.name}", compose.down),
        ("removing Docker objects", lambda: asyncio.run(remove_docker_objects(names))),
        (f"removing networks of {compose.name}", lambda: asyncio.run(remove_compose_networks(compose.name))),
        ("stopping Caddy", caddy.stop),
        ("deleting Redis keys", lambda: asyncio.run(delete_queue_keys(names, deployment_ids))),
        (f"dropping database {names.database}", lambda: asyncio.run(drop_database(names.database))),
    ]
    if keep_logs:
        for path in (caddy.log_path, compose.file):
            if path.exists():
                steps.append((f"keeping {path.name}", lambda path=path: shutil.copy(path, services.log_dir)))
    steps.append(("removing the temporary directory", lambda: shutil.rmtree(work_dir)))
    for description, step in steps:
        try:
            step()
        except Exception as error:  # noqa: BLE001  (the remaining steps must still run)
            print(f"cleanup: {description} failed: {type(error).__name__}: {error}", file=sys.stderr)
    if keep_logs:
        print(f"service and Caddy logs kept in {services.log_dir}")


# --- command line ------------------------------------------------------------------------------


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Count failed requests through Caddy during blue-green, recreate and docker-compose deployments.",
    )
    parser.add_argument("--deployments", type=int, default=20, help="measured deployments per scenario (default 20)")
    parser.add_argument("--rps", type=float, default=300.0, help="requests per second in total (default 300)")
    parser.add_argument("--clients", type=int, default=10, help="concurrent keep-alive connections (default 10)")
    parser.add_argument(
        "--watch-seconds", type=float, default=2.0, help="sets JARVIS_WATCH_SECONDS for the worker (default 2)"
    )
    parser.add_argument(
        "--drain-seconds", type=float, default=1.0, help="sets JARVIS_DRAIN_SECONDS for the worker (default 1)"
    )
    parser.add_argument(
        "--interval", type=float, default=0.1, help="seconds between two health probes (default 0.1, minimum 0.05)"
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds one deployment may take (default 120)"
    )
    parser.add_argument(
        "--tail",
        type=float,
        default=1.0,
        help="seconds the load keeps running after a scenario's last deployment (default 1)",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated scenarios to run, in this order (default {','.join(SCENARIOS)})",
    )
    parser.add_argument(
        "--upstreams",
        choices=("lookup", "list"),
        default="lookup",
        help=(
            "how Caddy finds the containers: `lookup` starts `jarvis-deploy resolver` and sets "
            "JARVIS_UPSTREAM_RESOLVER, so a switch needs no Caddy reload; `list` changes the route's upstream "
            "list through the admin API, which reloads Caddy (default lookup)"
        ),
    )
    add_service_arguments(parser, "the API, worker, resolver and Caddy logs")

    arguments = parser.parse_args()
    if arguments.deployments < 1:
        parser.error(f"--deployments must be at least 1, got {arguments.deployments}")
    if arguments.rps <= 0:
        parser.error(f"--rps must be greater than 0, got {arguments.rps}")
    if arguments.clients < 1:
        parser.error(f"--clients must be at least 1, got {arguments.clients}")
    if arguments.watch_seconds < 0 or arguments.drain_seconds < 0:
        parser.error("--watch-seconds and --drain-seconds must be 0 or more")
    if arguments.interval < 0.05:
        parser.error(f"--interval must be at least 0.05 s, the service's minimum, got {arguments.interval}")
    scenarios = [name.strip() for name in arguments.scenarios.split(",") if name.strip()]
    unknown = [name for name in scenarios if name not in SCENARIOS]
    if unknown or not scenarios:
        parser.error(f"--scenarios: unknown or empty {unknown or scenarios}; choose from {', '.join(SCENARIOS)}")
    arguments.scenarios = scenarios

    arguments.service_root = arguments.service_root.resolve()
    if not (arguments.service_root / "src" / "jarvis_deploy" / "cli.py").is_file():
        parser.error(
            f"--service-root {arguments.service_root} has no src/jarvis_deploy/cli.py. Pass a jarvis-deploy checkout"
        )
    # service_environment() of deploy_latency.py reads this option, which this benchmark does not offer.
    arguments.worker_poll_delay = None
    return arguments


def main() -> int:
    arguments = parse_arguments()
    names = BenchNames(secrets.token_hex(4))
    work_dir = Path(tempfile.mkdtemp(prefix="jarvis-bench-zero-downtime-"))
    keep_logs = arguments.log_dir is not None
    if keep_logs:
        arguments.log_dir.mkdir(parents=True, exist_ok=True)
    services = ServiceProcesses(arguments.log_dir if keep_logs else work_dir)
    caddy = CaddyProcess(work_dir)
    compose = ComposeProject(f"jarvisbench{names.run_id}", work_dir, free_port(), names.run_id)
    deployment_ids: list[str] = []

    environment = service_environment(names, arguments)
    settings = {
        "JARVIS_CADDY_ADMIN_URL": caddy.admin_url,
        "JARVIS_CADDY_SERVER": CADDY_SERVER,
        "JARVIS_CADDY_LISTEN": json.dumps([f"127.0.0.1:{caddy.http_port}"]),
        "JARVIS_UPSTREAM_MODE": "loopback",
        "JARVIS_WATCH_SECONDS": f"{arguments.watch_seconds:g}",
        "JARVIS_DRAIN_SECONDS": f"{arguments.drain_seconds:g}",
    }
    environment.update(settings)

    # Outside asyncio.run, SIGTERM raises KeyboardInterrupt like Ctrl-C does, so the cleanup below runs.
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)

    print(f"benchmark id {names.run_id}: database {names.database}, queue {names.queue}, compose project {compose.name}")
    print(f"Caddy {caddy_version()}: admin {caddy.admin_url}, HTTP 127.0.0.1:{caddy.http_port}")
    print(
        f"load: {arguments.rps:g} requests/s over {arguments.clients} keep-alive connections, GET {VERSION_PATH}; "
        f"{arguments.deployments} deployments per scenario; scenarios {', '.join(arguments.scenarios)}"
    )
    for key, value in settings.items():
        print(f"  {key}={value}")
    print(f"  health check: HTTP GET {HEALTH_PATH} every {arguments.interval:g} s", flush=True)

    try:
        caddy.start()
        root = arguments.service_root
        migrate_database(environment, root)
        token = create_admin_token(environment, root, f"bench-{names.run_id}")
        if arguments.upstreams == "lookup":
            print(f"  JARVIS_UPSTREAM_RESOLVER={start_upstream_resolver(services, environment, root)}", flush=True)
        start_service(services, "worker", ["worker"], environment, root)
        wait_for_worker(services)
        api_port = free_port()
        start_service(services, "api", ["api", "--host", "127.0.0.1", "--port", str(api_port)], environment, root)
        asyncio.run(
            benchmark(arguments, names, f"http://127.0.0.1:{api_port}", token, services, caddy, compose, deployment_ids)
        )
        return 0
    except BenchmarkError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        for name, _ in services.processes:
            print(f"--- last lines of the {name} log ---\n{read_log_tail(services.log_path(name))}", file=sys.stderr)
        print(f"--- last lines of the Caddy log ---\n{read_log_tail(caddy.log_path)}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted, cleaning up", file=sys.stderr)
        return 130
    finally:
        # asyncio.run resets SIGTERM to the default action when its loop closes.
        signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
        clean_up(names, services, caddy, compose, deployment_ids, work_dir, keep_logs)


if __name__ == "__main__":
    sys.exit(main())

"""Measure how long jarvis-deploy takes to deploy a small image, against a plain `docker run`.

The script starts its own copy of the service: a fresh database `jarvis_bench_<random>`, its own
arq queue, the API and one worker as subprocesses. It creates a project and deploys one image
--runs times with the `recreate` strategy on a fixed host port. Each deployment sets the
environment variable BENCH_RUN to the run number, so every request has a new checksum. A run
lasts from sending POST /api/jarvis/deployments/deploy to the first GET of the deployment that
reads `succeeded`.

The baseline is `docker run -d --rm -p 127.0.0.1:<port>:8080 <image>` (with a name and a label
for the cleanup) followed by the same HTTP probe, measured from launching `docker run` to the
first 200. Its `docker rm -f` afterwards is not timed. Baseline runs alternate with the jarvis
runs (A, B, A, B), so load from other processes on the machine hits both.

The script prints both times of each run, the median and p90 of both, the ratio of the medians,
and the median time between the deployment's events. It removes everything it created, also
after Ctrl-C, SIGTERM or an error: its containers, networks and volumes, its Redis keys, the
service processes and the database. All traffic goes to 127.0.0.1.

Usage, from the repository root, with PostgreSQL, Redis, the Docker Engine and the test images
of scripts/test.sh in place, and a virtualenv that has the package's dependencies (scripts/install.sh
makes .venv):

    PYTHONPATH=src:. .venv/bin/python bench/deploy_latency.py --runs 10
"""

import argparse
import asyncio
import math
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import aiodocker
import asyncpg
import httpx
import redis.asyncio as redis

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_SERVER = os.environ.get("JARVIS_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("JARVIS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
DEFAULT_IMAGE = "localhost:5000/jarvis-testapp:v1"
APP_PORT = 8080
HEALTH_PATH = "/cgi-bin/health"
PROJECT_LABEL = "dev.jarvis-deploy.project"
BASELINE_LABEL = "dev.jarvis-deploy.bench"
STATUS_POLL_INTERVAL = 0.02
PROBE_TIMEOUT = 2.0
STARTUP_TIMEOUT = 60.0
PROCESS_STOP_TIMEOUT = 30.0
# Deployment states after which `succeeded` can no longer come.
FINAL_STATES = {"failed", "rolled_back", "cancelled", "superseded", "stopped"}


class BenchmarkError(Exception):
    """A step of the benchmark failed. The message names the step and the reason."""


@dataclass(frozen=True)
class BenchNames:
    """Names of everything one benchmark run creates, all derived from one random id."""

    run_id: str

    @property
    def database(self) -> str:
        return f"jarvis_bench_{self.run_id}"

    @property
    def database_url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:5432/{self.database}"

    @property
    def queue(self) -> str:
        return f"jarvis-bench-{self.run_id}"

    @property
    def proxy_network(self) -> str:
        return f"jarvis-bench-proxy-{self.run_id}"

    @property
    def project(self) -> str:
        return f"bench{self.run_id}"

    def baseline_container(self, run: int) -> str:
        return f"jarvis-bench-{self.run_id}-baseline-{run}"


@dataclass
class JarvisSample:
    """One timed deployment: wall time in seconds and the deployment as the last poll returned it."""

    seconds: float
    post_seconds: float
    sent_at: datetime
    seen_at: datetime
    deployment: dict


@dataclass
class BaselineSample:
    """One timed `docker run`: total seconds, the part spent in the `docker run` command, probe count."""

    seconds: float
    docker_run_seconds: float
    probes: int


@dataclass
class ServiceProcesses:
    """The API and worker subprocesses with their log files, in the order they were started."""

    log_dir: Path
    processes: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"


def add_service_arguments(parser: argparse.ArgumentParser, logs: str) -> None:
    """Add --service-root and --log-dir, shared by the benchmarks that start the service."""
    parser.add_argument(
        "--service-root",
        type=Path,
        default=ROOT,
        help="jarvis-deploy checkout to run the migration, the API and the worker from "
        "(default: the repository that contains this script)",
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help=f"directory to keep {logs} in (default: a temporary directory, removed at the end)",
    )


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compare the deployment latency of jarvis-deploy with a plain `docker run` of the same image.",
    )

    parser.add_argument("--runs", type=int, default=10, help="timed deployments and baseline runs each (default 10)")
    parser.add_argument("--image", default=DEFAULT_IMAGE, help=f"image to deploy (default {DEFAULT_IMAGE})")
    parser.add_argument(
        "--interval",
        type=float,
        default=0.1,
        help="seconds between two health probes, for the service and the baseline (default 0.1, minimum 0.05)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed pairs before the timed runs; they pull the image if needed and leave a container "
        "for the first timed run to replace (default 1)",
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds one deployment or baseline run may take (default 120)"
    )
    parser.add_argument(
        "--worker-poll-delay",
        type=float,
        default=None,
        help="sets JARVIS_WORKER_POLL_DELAY for the worker, in seconds (default: the service's default)",
    )
    add_service_arguments(parser, "the API and worker logs")

    arguments = parser.parse_args()
    if arguments.runs < 1:
        parser.error(f"--runs must be at least 1, got {arguments.runs}")
    if arguments.warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {arguments.warmup}")
    if arguments.interval < 0.05:
        parser.error(f"--interval must be at least 0.05 s, the service's minimum, got {arguments.interval}")
    if arguments.worker_poll_delay is not None and arguments.worker_poll_delay <= 0:
        parser.error(f"--worker-poll-delay must be greater than 0, got {arguments.worker_poll_delay}")

    arguments.service_root = arguments.service_root.resolve()
    if not (arguments.service_root / "src" / "jarvis_deploy" / "cli.py").is_file():
        parser.error(
            f"--service-root {arguments.service_root} has no src/jarvis_deploy/cli.py. Pass a jarvis-deploy checkout"
        )
    return arguments


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def service_environment(names: BenchNames, arguments: argparse.Namespace) -> dict[str, str]:
    root = arguments.service_root
    python_path = [str(root / "src"), str(root)]
    if os.environ.get("PYTHONPATH"):
        python_path.append(os.environ["PYTHONPATH"])
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(python_path),
        "JARVIS_DATABASE_URL": names.database_url,
        "JARVIS_REDIS_URL": REDIS_URL,
        "JARVIS_QUEUE_NAME": names.queue,
        "JARVIS_PROXY_NETWORK": names.proxy_network,
        "JARVIS_PUBLISH_HOST_IP": "127.0.0.1",
    }
    if arguments.worker_poll_delay is not None:
        environment["JARVIS_WORKER_POLL_DELAY"] = str(arguments.worker_poll_delay)
    return environment


# --- service processes -------------------------------------------------------------------------


def migrate_database(environment: dict[str, str], root: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "jarvis_deploy.cli", "migrate"],
        env=environment,
        cwd=root,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise BenchmarkError(f"jarvis-deploy migrate failed with exit code {result.returncode}:\n{result.stderr}")


def create_admin_token(environment: dict[str, str], root: Path, name: str) -> str:
    """Create an admin API token with the CLI, as an operator on the host would."""
    result = subprocess.run(
        [sys.executable, "-m", "jarvis_deploy.cli", "token", "create", "--name", name, "--scope", "admin"],
        env=environment,
        cwd=root,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise BenchmarkError(f"jarvis-deploy token create failed with exit code {result.returncode}:\n{result.stderr}")
    return result.stdout.strip()


def start_service(
    services: ServiceProcesses, name: str, arguments: list[str], environment: dict[str, str], root: Path
) -> None:
    # A session of its own keeps Ctrl-C away from the service, so the script decides the order of
    # shutdown: the worker first, so that it starts no container while the rest is removed.
    with services.log_path(name).open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "jarvis_deploy.cli", *arguments],
            env=environment,
            cwd=root,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    services.processes.append((name, process))


def start_upstream_resolver(services: ServiceProcesses, environment: dict[str, str], root: Path) -> str:
    """Start `jarvis-deploy resolver` on a free UDP port of 127.0.0.1 and wait until it responds to a lookup.

    Sets JARVIS_UPSTREAM_RESOLVER in `environment`, so start it before the worker. Returns the address.
    """
    from jarvis_deploy.proxy.lookup import (
        ResolverUnavailable,
        lookup_name,
        query_addresses,
    )

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    environment["JARVIS_UPSTREAM_RESOLVER"] = address
    start_service(services, "resolver", ["resolver"], environment, root)

    name, process = services.processes[-1]
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        try:
            asyncio.run(query_addresses(address, lookup_name("bench-ready", 80, "ready"), timeout=0.5))
            return address
        except ResolverUnavailable:
            if process.poll() is not None or time.monotonic() > deadline:
                raise BenchmarkError(f"the resolver did not start:\n{read_log_tail(services.log_path(name))}") from None
            time.sleep(0.1)


def read_log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log file)"
    return "\n".join(text.splitlines()[-lines:])


def wait_for_worker(services: ServiceProcesses) -> None:
    """Wait until the worker logs `worker.started`, which its start-up hook does just before arq polls the queue."""
    name, process = services.processes[-1]
    log_path = services.log_path(name)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while b"worker.started" not in log_path.read_bytes():
        if process.poll() is not None:
            raise BenchmarkError(f"the worker exited with code {process.returncode}:\n{read_log_tail(log_path)}")
        if time.monotonic() > deadline:
            raise BenchmarkError(f"the worker did not start within {STARTUP_TIMEOUT:g} s:\n{read_log_tail(log_path)}")
        time.sleep(0.1)


async def wait_for_api(services: ServiceProcesses, client: httpx.AsyncClient) -> None:
    """Poll /readyz until the API reports the database, Redis and Docker as ready."""
    name, process = services.processes[-1]
    deadline = time.monotonic() + STARTUP_TIMEOUT
    last_state = "no response"
    while True:
        if process.poll() is not None:
            log_tail = read_log_tail(services.log_path(name))
            raise BenchmarkError(f"the API exited with code {process.returncode}:\n{log_tail}")
        try:
            response = await client.get("/readyz")
            if response.status_code == 200:
                return
            last_state = f"{response.status_code} {response.text}"
        except httpx.TransportError as error:
            last_state = f"{type(error).__name__}: {error}"
        if time.monotonic() > deadline:
            raise BenchmarkError(
                f"/readyz did not return 200 within {STARTUP_TIMEOUT:g} s. Last response: {last_state}"
            )
        await asyncio.sleep(0.1)


def stop_services(services: ServiceProcesses) -> None:
    """Stop the worker, then the API. A process that ignores SIGTERM for 30 s gets SIGKILL."""
    for name, process in sorted(services.processes, key=lambda item: item[0] != "worker"):
        if process.poll() is not None:
            continue
        process.terminate()
        try:
            process.wait(timeout=PROCESS_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            message = f"{name} (pid {process.pid}) ignored SIGTERM for {PROCESS_STOP_TIMEOUT:g} s, sending SIGKILL"
            print(message, file=sys.stderr)
            process.kill()
            process.wait()


# --- one jarvis run and one baseline run -------------------------------------------------------


async def create_project(client: httpx.AsyncClient, name: str) -> str:
    response = await client.post("/api/jarvis/projects", json={"name": name})
    if response.status_code != 201:
        raise BenchmarkError(f"creating project {name} failed: {response.status_code} {response.text}")
    return response.json()["id"]


def deploy_request(project_id: str, image: str, host_port: int, interval: float, run: int) -> dict:
    return {
        "project_id": project_id,
        "image_ref": image,
        "port": APP_PORT,
        "host_port": host_port,
        "strategy": "recreate",
        # A new value per run changes the rendered document and its checksum, so each run is a real change.
        "environment": {"BENCH_RUN": str(run)},
        "healthcheck": {"type": "http", "path": HEALTH_PATH, "interval": interval},
    }


async def run_jarvis(
    client: httpx.AsyncClient, request: dict, timeout: float, deployment_ids: list[str]
) -> JarvisSample:
    """Deploy once and poll the deployment every 20 ms until it reads `succeeded`."""
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


async def run_docker(*arguments: str) -> str:
    """Run the docker CLI and return its standard output. Raise BenchmarkError when it fails."""
    process = await asyncio.create_subprocess_exec(
        "docker", *arguments, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await process.communicate()
    if process.returncode != 0:
        command = " ".join(["docker", *arguments])
        raise BenchmarkError(f"`{command}` failed with exit code {process.returncode}: {stderr.decode().strip()}")
    return stdout.decode().strip()


async def run_baseline(
    probe_client: httpx.AsyncClient,
    names: BenchNames,
    image: str,
    host_port: int,
    interval: float,
    run: int,
    timeout: float,
) -> BaselineSample:
    """Start the image with `docker run`, probe it until it returns 200, then remove it."""
    container = names.baseline_container(run)
    url = f"http://127.0.0.1:{host_port}{HEALTH_PATH}"
    started = time.perf_counter()
    # The name and label let the cleanup find the container if the script stops before `docker rm`.
    await run_docker(
        "run",
        "-d",
        "--rm",
        "--name",
        container,
        "--label",
        f"{BASELINE_LABEL}={names.run_id}",
        "-p",
        f"127.0.0.1:{host_port}:{APP_PORT}",
        image,
    )
    docker_run_seconds = time.perf_counter() - started

    probes = 0
    last_error = "no probe sent"
    try:
        while True:
            round_started = time.perf_counter()
            probes += 1
            try:
                response = await probe_client.get(url)
                if response.status_code == 200:
                    return BaselineSample(time.perf_counter() - started, docker_run_seconds, probes)
                last_error = f"status {response.status_code}"
            except httpx.TransportError as error:
                last_error = f"{type(error).__name__}: {error}"
            if time.perf_counter() - started > timeout:
                raise BenchmarkError(
                    f"baseline container {container} did not return 200 on {url} within {timeout:g} s. "
                    f"Last probe: {last_error}"
                )
            await asyncio.sleep(max(0.0, interval - (time.perf_counter() - round_started)))
    finally:
        await remove_baseline_container(container)


async def remove_baseline_container(container: str) -> None:
    try:
        await run_docker("rm", "-f", container)
    except BenchmarkError as error:
        # `--rm` makes the daemon remove the container itself once it exits, and that removal can
        # win the race against `docker rm -f`. Either way the container is gone.
        if "already in progress" not in str(error) and "No such container" not in str(error):
            raise


# --- statistics and report ---------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile: the smallest value that `fraction` of all values are at most."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def parse_timestamp(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def timeline_steps(sample: JarvisSample) -> list[tuple[str, float]]:
    """Split one deployment's wall time into the gaps between its events, in milliseconds.

    The points are: POST sent, each event up to the last one before the status turned
    `succeeded`, `finished_at` (when the worker set the status), and the poll that saw it. The
    `succeeded` event is written after the status, so it is left out. Event times come from the
    database's clock_timestamp(), which runs on this machine's clock.
    """
    deployment = sample.deployment
    finished_at = parse_timestamp(deployment["finished_at"])
    points: list[tuple[str, datetime]] = [("POST sent", sample.sent_at)]
    for event in deployment.get("events", []):
        if event["stage"] == "succeeded":
            continue
        points.append((event["stage"], parse_timestamp(event["created_at"])))
    points.append(("status succeeded", finished_at))
    points.append(("poll saw succeeded", sample.seen_at))

    steps = []
    for (previous_name, previous_time), (name, moment) in zip(points, points[1:]):
        steps.append((f"{previous_name} -> {name}", (moment - previous_time).total_seconds() * 1000))
    return steps


def event_durations(sample: JarvisSample) -> dict[str, float]:
    """Return duration_ms of the events that carry one, by stage."""
    return {
        event["stage"]: float(event["duration_ms"])
        for event in sample.deployment.get("events", [])
        if event.get("duration_ms") is not None
    }


def print_report(jarvis: list[JarvisSample], baseline: list[BaselineSample]) -> None:
    print()
    print(f"{'run':>4} {'jarvis s':>9} {'baseline s':>11} {'docker run s':>13} {'probes':>7}")
    for run, (deployment, plain) in enumerate(zip(jarvis, baseline, strict=True), start=1):
        print(
            f"{run:>4} {deployment.seconds:>9.3f} {plain.seconds:>11.3f} "
            f"{plain.docker_run_seconds:>13.3f} {plain.probes:>7}"
        )

    jarvis_seconds = [sample.seconds for sample in jarvis]
    baseline_seconds = [sample.seconds for sample in baseline]
    jarvis_median = statistics.median(jarvis_seconds)
    baseline_median = statistics.median(baseline_seconds)
    ratio = jarvis_median / baseline_median
    print()
    print(f"jarvis   median {jarvis_median:.3f} s  p90 {percentile(jarvis_seconds, 0.9):.3f} s")
    print(f"baseline median {baseline_median:.3f} s  p90 {percentile(baseline_seconds, 0.9):.3f} s")
    verdict = "met" if ratio <= 3.0 else "not met"
    print(f"ratio median(jarvis)/median(baseline) = {ratio:.2f} (target <= 3.0: {verdict})")

    print()
    print("jarvis time between events, median over the timed runs (ms):")
    steps: dict[str, list[float]] = {}
    for sample in jarvis:
        for name, milliseconds in timeline_steps(sample):
            steps.setdefault(name, []).append(milliseconds)
    for name, values in steps.items():
        partial = "" if len(values) == len(jarvis) else f"  (in {len(values)} of {len(jarvis)} runs)"
        print(f"  {statistics.median(values):8.1f}  {name}{partial}")
    post_milliseconds = statistics.median(sample.post_seconds * 1000 for sample in jarvis)
    print(f"  {post_milliseconds:8.1f}  POST round trip, as the client saw it")

    durations: dict[str, list[float]] = {}
    for sample in jarvis:
        for stage, milliseconds in event_durations(sample).items():
            durations.setdefault(stage, []).append(milliseconds)
    if durations:
        print("event duration_ms, median:")
        for stage, values in durations.items():
            print(f"  {statistics.median(values):8.1f}  {stage}")
    print(
        "baseline median: docker run command "
        f"{statistics.median(sample.docker_run_seconds * 1000 for sample in baseline):.1f} ms, "
        f"probes {statistics.median(sample.probes for sample in baseline):g}"
    )


# --- the benchmark -----------------------------------------------------------------------------


async def benchmark(
    arguments: argparse.Namespace,
    names: BenchNames,
    api_url: str,
    token: str,
    services: ServiceProcesses,
    deployment_ids: list[str],
) -> None:
    # Inside the loop, SIGTERM cancels this task, so its finally blocks run while the loop still
    # runs and every subprocess transport closes in order.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)

    jarvis_port = free_port()
    baseline_port = free_port()
    # trust_env=False keeps HTTP_PROXY and similar variables from sending loopback traffic elsewhere.
    async with (
        httpx.AsyncClient(
            base_url=api_url, trust_env=False, timeout=30.0, headers={"Authorization": f"Bearer {token}"}
        ) as client,
        # Like the service's own probe, the baseline opens a new connection for every probe.
        httpx.AsyncClient(
            trust_env=False, timeout=PROBE_TIMEOUT, limits=httpx.Limits(max_keepalive_connections=0)
        ) as probe_client,
    ):
        await wait_for_api(services, client)
        project_id = await create_project(client, names.project)
        print(
            f"project {names.project}, image {arguments.image}, host port {jarvis_port} (jarvis) and "
            f"{baseline_port} (baseline), probe interval {arguments.interval:g} s"
        )

        jarvis: list[JarvisSample] = []
        baseline: list[BaselineSample] = []
        for run in range(1 - arguments.warmup, arguments.runs + 1):
            request = deploy_request(project_id, arguments.image, jarvis_port, arguments.interval, run)
            deployment = await run_jarvis(client, request, arguments.timeout, deployment_ids)
            plain = await run_baseline(
                probe_client, names, arguments.image, baseline_port, arguments.interval, run, arguments.timeout
            )
            label = f"warm-up {run + arguments.warmup}" if run < 1 else f"run {run}"
            print(f"{label:>10}: jarvis {deployment.seconds:.3f} s, baseline {plain.seconds:.3f} s", flush=True)
            if run >= 1:
                jarvis.append(deployment)
                baseline.append(plain)

        print_report(jarvis, baseline)


# --- cleanup -----------------------------------------------------------------------------------


async def remove_docker_objects(names: BenchNames) -> None:
    """Remove the project's containers, networks and volumes, the baseline containers and the proxy network."""
    async with aiodocker.Docker() as docker:
        for label_filter in (f"{PROJECT_LABEL}={names.project}", f"{BASELINE_LABEL}={names.run_id}"):
            for container in await docker.containers.list(all=True, filters={"label": [label_filter]}):
                await container.delete(force=True)

        project_filter = {"label": [f"{PROJECT_LABEL}={names.project}"]}
        network_ids = [network["Id"] for network in await docker.networks.list(filters=project_filter)]
        network_ids += [
            network["Id"] for network in await docker.networks.list(filters={"name": [names.proxy_network]})
            if network["Name"] == names.proxy_network
        ]
        for network_id in network_ids:
            try:
                await (await docker.networks.get(network_id)).delete()
            except aiodocker.DockerError as error:
                print(f"removing network {network_id} failed: {error}", file=sys.stderr)

        volumes = await docker.volumes.list(filters=project_filter)
        for volume in volumes.get("Volumes") or []:
            try:
                await (await docker.volumes.get(volume["Name"])).delete()
            except aiodocker.DockerError as error:
                print(f"removing volume {volume['Name']} failed: {error}", file=sys.stderr)


async def delete_queue_keys(names: BenchNames, deployment_ids: list[str]) -> None:
    """Delete the arq keys of this run's queue and deployments, and no other keys."""
    keys = [names.queue, f"{names.queue}:health-check"]
    for deployment_id in deployment_ids:
        job_id = f"run_deployment:{deployment_id}"
        keys += [f"arq:job:{job_id}", f"arq:in-progress:{job_id}", f"arq:retry:{job_id}", f"arq:result:{job_id}"]
    client = redis.from_url(REDIS_URL)
    try:
        await client.delete(*keys)
    finally:
        await client.aclose()


async def drop_database(name: str) -> None:
    connection = await asyncpg.connect(POSTGRES_SERVER)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


def clean_up(names: BenchNames, services: ServiceProcesses, deployment_ids: list[str], keep_logs: bool) -> None:
    """Remove everything the benchmark created. A failed step is reported, and the next one still runs."""
    steps = [
        ("stopping the API and the worker", lambda: stop_services(services)),
        ("removing Docker objects", lambda: asyncio.run(remove_docker_objects(names))),
        ("deleting Redis keys", lambda: asyncio.run(delete_queue_keys(names, deployment_ids))),
        (f"dropping database {names.database}", lambda: asyncio.run(drop_database(names.database))),
    ]
    if not keep_logs:
        steps.append(("removing the log directory", lambda: shutil.rmtree(services.log_dir)))
    for description, step in steps:
        try:
            step()
        except Exception as error:  # noqa: BLE001  (the remaining steps must still run)
            print(f"cleanup: {description} failed: {type(error).__name__}: {error}", file=sys.stderr)
    if keep_logs:
        print(f"service logs kept in {services.log_dir}")


def raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"received signal {signal.Signals(signum).name}")


def main() -> int:
    arguments = parse_arguments()
    names = BenchNames(secrets.token_hex(4))
    environment = service_environment(names, arguments)
    keep_logs = arguments.log_dir is not None
    if keep_logs:
        arguments.log_dir.mkdir(parents=True, exist_ok=True)
        log_dir = arguments.log_dir
    else:
        log_dir = Path(tempfile.mkdtemp(prefix="jarvis-bench-"))
    services = ServiceProcesses(log_dir)
    deployment_ids: list[str] = []

    # Outside asyncio.run, SIGTERM raises KeyboardInterrupt like Ctrl-C does, so the cleanup below
    # runs. A shell starts background jobs with SIGINT ignored, so SIGTERM is their only way.
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)

    print(f"benchmark id {names.run_id}: database {names.database}, queue {names.queue}")
    try:
        root = arguments.service_root
        migrate_database(environment, root)
        token = create_admin_token(environment, root, f"bench-{names.run_id}")
        start_service(services, "worker", ["worker"], environment, root)
        wait_for_worker(services)
        api_port = free_port()
        api_arguments = ["api", "--host", "127.0.0.1", "--port", str(api_port)]
        start_service(services, "api", api_arguments, environment, root)
        asyncio.run(benchmark(arguments, names, f"http://127.0.0.1:{api_port}", token, services, deployment_ids))
        return 0
    except BenchmarkError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        for name, _ in services.processes:
            print(f"--- last lines of the {name} log ---\n{read_log_tail(services.log_path(name))}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted, cleaning up", file=sys.stderr)
        return 130
    finally:
        # asyncio.run resets SIGTERM to the default action when its loop closes.
        signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
        clean_up(names, services, deployment_ids, keep_logs)


if __name__ == "__main__":
    sys.exit(main())

"""Docker Engine restart during a deployment, on a private dockerd that this module starts and removes.

The shared engine must keep running, so the module starts a dockerd of its own. Its data root,
exec root, pidfile, socket and configuration file lie in a temporary directory, and it uses a Linux
bridge on an unused private /24 instead of docker0. It runs with `--iptables=false`, so it leaves
the shared daemon's iptables chains alone. Published ports on 127.0.0.1 work through docker-proxy.
"""

import asyncio
import ipaddress
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
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiodocker
import httpx
import pytest

from tests.conftest import (
    ROOT,
    api_client,
    app_image,
    free_port,
    remove_project_objects,
    settle_project,
    wait_for_event,
    wait_for_status,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

PROJECT_LABEL = "dev.jarvis-deploy.project"
DEPLOYMENT_LABEL = "dev.jarvis-deploy.deployment"
FINAL_STATES = {"succeeded", "failed", "rolled_back", "cancelled", "stopped", "superseded"}
# v2 waits START_DELAY seconds before it listens, so its health check can only fail. These values
# give the check 60 x 0.5 s = 30 s of failing probes, far more than the engine restart takes.
HEALTH = {"type": "http", "path": "/cgi-bin/health", "interval": 0.5, "timeout": 1, "retries": 60}
START_DELAY_SECONDS = "600"
# Bounds of the requirement, counted from the moment the restarted engine responds to /_ping. The
# worker runs recovery every 30 s, so each bound leaves room for at least two recovery rounds.
FINAL_STATE_SECONDS = 120
RECOVERY_SECONDS = 90
DAEMON_START_SECONDS = 60
DAEMON_STOP_SECONDS = 60


def run_ip(*arguments: str) -> str:
    """Run `ip` with the arguments and return its output, or raise RuntimeError with its stderr."""
    result = subprocess.run(["ip", *arguments], capture_output=True, text=True)
    if result.returncode != 0:
        command = " ".join(["ip", *arguments])
        raise RuntimeError(f"`{command}` failed with exit code {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def host_ipv4_networks() -> list[ipaddress.IPv4Network]:
    """List the IPv4 networks that the host's addresses and routes already use."""
    networks = []
    for link in json.loads(run_ip("-j", "-4", "addr", "show")):
        for address in link.get("addr_info", []):
            networks.append(ipaddress.ip_network(f"{address['local']}/{address['prefixlen']}", strict=False))
    for route in json.loads(run_ip("-j", "-4", "route", "show", "table", "all")):
        destination = route.get("dst", "default")
        if destination != "default":
            networks.append(ipaddress.ip_network(destination, strict=False))
    return networks


def pick_free_subnets(count: int) -> list[ipaddress.IPv4Network]:
    """Pick `count` random /24 networks inside 10.0.0.0/8 that overlap nothing on the host."""
    used = host_ipv4_networks()
    chosen: list[ipaddress.IPv4Network] = []
    for _ in range(1000):
        candidate = ipaddress.ip_network(f"10.{random.randint(64, 250)}.{random.randint(0, 255)}.0/24")
        if not any(candidate.overlaps(network) for network in used + chosen):
            chosen.append(candidate)
            if len(chosen) == count:
                return chosen
    raise RuntimeError(f"found no {count} unused /24 networks in 10.0.0.0/8; the host uses {used}")


def links_in_subnet(subnet: ipaddress.IPv4Network) -> list[str]:
    """Return the names of the links that have an IPv4 address inside `subnet`."""
    names = []
    for link in json.loads(run_ip("-j", "-4", "addr", "show")):
        if any(ipaddress.ip_address(address["local"]) in subnet for address in link.get("addr_info", [])):
            names.append(link["ifname"])
    return names


def mounts_under(directory: Path) -> list[str]:
    """Return the mount points inside `directory`, deepest first."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if point == str(directory) or point.startswith(f"{directory}/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def engine_processes_under(directory: Path) -> list[int]:
    """Return the PIDs of dockerd, containerd and shim processes whose command line names `directory`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            arguments = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        program = Path(arguments[0]).name
        if program.startswith(("dockerd", "containerd")) and any(str(directory) in argument for argument in arguments):
            pids.append(int(entry.name))
    return pids


@dataclass
class PrivateDockerd:
    """A dockerd of this test module, with paths, a bridge and an address pool of its own."""

    directory: Path
    bridge: str
    bridge_subnet: ipaddress.IPv4Network
    pool_subnet: ipaddress.IPv4Network
    process: subprocess.Popen | None = None
    restarts: list[dict[str, float]] = field(default_factory=list)

    @property
    def socket(self) -> Path:
        return self.directory / "docker.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def log_path(self) -> Path:
        return self.directory / "dockerd.log"

    def command(self) -> list[str]:
        """Build the dockerd command line, which is the same for every start of this daemon."""
        return [
            "dockerd",
            "--host", self.url,
            "--config-file", str(self.directory / "daemon.json"),
            "--data-root", str(self.directory / "data"),
            "--exec-root", str(self.directory / "exec"),
            "--pidfile", str(self.directory / "dockerd.pid"),
            "--bridge", self.bridge,
            "--default-address-pool", f"base={self.pool_subnet},size=26",
            "--iptables=false",
            "--ip6tables=false",
            "--userland-proxy=true",
        ]  # fmt: skip

    def start(self) -> None:
        """Start dockerd and wait until it responds to /_ping on its socket."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        deadline = time.monotonic() + DAEMON_START_SECONDS
        while not self.responds_to_ping():
            if self.process.poll() is not None:
                raise RuntimeError(f"dockerd exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not respond to /_ping within {DAEMON_START_SECONDS} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Send SIGTERM to dockerd and wait for it to exit, with SIGKILL after DAEMON_STOP_SECONDS."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=DAEMON_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)

    def restart(self) -> dict[str, float]:
        """Stop and start dockerd with the same flags, and return how long each step took in seconds."""
        began = time.monotonic()
        self.stop()
        stopped = time.monotonic()
        self.start()
        timings = {"stop_seconds": stopped - began, "start_seconds": time.monotonic() - stopped}
        self.restarts.append(timings)
        return timings

    def responds_to_ping(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), timeout=2) as http:
                return http.get("http://docker/_ping").text == "OK"
        except httpx.TransportError:
            return False

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def remove_objects(self) -> None:
        """Remove every container, network and volume on this daemon, which runs only this module's objects."""
        transport = httpx.HTTPTransport(uds=str(self.socket))
        with httpx.Client(transport=transport, base_url="http://docker", timeout=60) as http:
            for container in http.get("/containers/json", params={"all": "1"}).json():
                http.delete(f"/containers/{container['Id']}", params={"force": "1", "v": "1"})
            for network in http.get("/networks").json():
                if network["Name"] not in ("bridge", "host", "none"):
                    http.delete(f"/networks/{network['Id']}")
            for volume in http.get("/volumes").json().get("Volumes") or []:
                http.delete(f"/volumes/{volume['Name']}")


def create_private_dockerd() -> PrivateDockerd:
    """Make the directory, configuration file and bridge of a private dockerd, without starting it."""
    bridge_subnet, pool_subnet = pick_free_subnets(2)
    directory = Path(tempfile.mkdtemp(prefix="jarvis-dockerd-", dir="/tmp"))
    # The configuration file keeps dockerd from reading /etc/docker/daemon.json, and the key path
    # keeps it from sharing /etc/docker/key.json with the shared daemon.
    (directory / "daemon.json").write_text(json.dumps({"deprecated-key-path": str(directory / "key.json")}))
    daemon = PrivateDockerd(directory, f"jd{secrets.token_hex(5)}", bridge_subnet, pool_subnet)
    try:
        run_ip("link", "add", daemon.bridge, "type", "bridge")
        run_ip("addr", "add", f"{bridge_subnet[1]}/{bridge_subnet.prefixlen}", "dev", daemon.bridge)
        run_ip("link", "set", daemon.bridge, "up")
    except RuntimeError:
        remove_private_dockerd(daemon)
        raise
    return daemon


def remove_private_dockerd(daemon: PrivateDockerd) -> None:
    """Stop the daemon and remove its leftovers: processes, mounts, links, directory and bridge."""
    daemon.stop()
    for pid in engine_processes_under(daemon.directory):
        os.kill(pid, signal.SIGKILL)
    for point in mounts_under(daemon.directory):
        subprocess.run(["umount", "--lazy", point], check=False)
    for link in links_in_subnet(daemon.pool_subnet):
        run_ip("link", "delete", link)
    if (Path("/sys/class/net") / daemon.bridge).exists():
        run_ip("link", "delete", daemon.bridge)
    shutil.rmtree(daemon.directory)


@pytest.fixture(scope="module")
def private_dockerd() -> Iterator[PrivateDockerd]:
    """Start a private dockerd, and remove its objects, processes, directory and bridge at the end."""
    daemon = create_private_dockerd()
    try:
        daemon.start()
        yield daemon
    finally:
        try:
            if daemon.responds_to_ping():
                daemon.remove_objects()
        finally:
            remove_private_dockerd(daemon)


@dataclass
class PrivateService:
    """An in-process API and a worker process on their own queue, both driving the private dockerd."""

    client: httpx.AsyncClient
    worker: subprocess.Popen
    worker_log: Path


@pytest.fixture
async def private_service(
    service_env, settings, admin_token, private_dockerd, tmp_path
) -> AsyncIterator[PrivateService]:
    """Start the worker and the API with JARVIS_DOCKER_URL on the private socket; stop the worker at the end."""
    from jarvis_deploy.api.app import create_app

    queue = f"jarvis-test-engine-restart-{secrets.token_hex(4)}"
    env = {**os.environ, **service_env, "JARVIS_QUEUE_NAME": queue, "JARVIS_DOCKER_URL": private_dockerd.url}
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "jarvis_deploy.cli", "worker"], env=env, cwd=ROOT, stdout=log, stderr=log
        )
    try:
        deadline = time.monotonic() + 30
        while b"worker.started" not in log_path.read_bytes():
            assert worker.poll() is None, f"worker exited:\n{log_path.read_text(errors='replace')}"
            assert time.monotonic() < deadline, f"worker did not start:\n{log_path.read_text(errors='replace')}"
            await asyncio.sleep(0.1)

        app = create_app(settings.model_copy(update={"queue_name": queue, "docker_url": private_dockerd.url}))
        async with app.router.lifespan_context(app), api_client(app, admin_token) as client:
            yield PrivateService(client, worker, log_path)
    finally:
        if worker.poll() is None:
            worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=10)


@pytest.fixture
async def private_project(private_service, private_dockerd) -> AsyncIterator[dict]:
    """Create a project with a random name, then settle its deployments and remove its Docker objects at the end."""
    name = f"t{secrets.token_hex(5)}"
    response = await private_service.client.post("/api/jarvis/projects", json={"name": name})
    assert response.status_code == 201, response.text
    yield response.json()
    await settle_project(private_service.client, response.json()["id"])
    if private_dockerd.responds_to_ping():
        async with aiodocker.Docker(url=private_dockerd.url) as docker:
            await remove_project_objects(docker, name)


async def deploy(client: httpx.AsyncClient, body: dict) -> dict:
    """Send a deploy request and return the accepted deployment."""
    response = await client.post("/api/jarvis/deployments/deploy", json=body)
    assert response.status_code == 202, response.text
    return response.json()


async def project_containers(daemon: PrivateDockerd, project: str) -> list[dict]:
    """List every container of the project on the private daemon, running or not."""
    filters = json.dumps({"label": [f"{PROJECT_LABEL}={project}"]})
    async with httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(daemon.socket)), base_url="http://docker", timeout=10
    ) as http:
        response = await http.get("/containers/json", params={"all": "1", "filters": filters})
    response.raise_for_status()
    return response.json()


async def served_version(port: int) -> str | None:
    """Return the body of /cgi-bin/version on 127.0.0.1:`port`, or None while it does not respond with 200."""
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=2) as http:
            response = await http.get(f"http://127.0.0.1:{port}/cgi-bin/version")
    except httpx.TransportError:
        return None
    return response.text.strip() if response.status_code == 200 else None


async def describe(service: PrivateService, daemon: PrivateDockerd, project: str, deployment_id: str) -> str:
    """Collect the deployment, its events, the project's containers and the worker's log for a failure message."""
    body = (await service.client.get(f"/api/jarvis/deployments/{deployment_id}")).json()
    events = "\n".join(f"  {event['stage']}: {event['message']}" for event in body.get("events", []))
    try:
        containers = "\n".join(
            f"  {item['Names'][0]} {item['State']} ({item['Status']}) deployment={item['Labels'].get(DEPLOYMENT_LABEL)}"
            for item in await project_containers(daemon, project)
        )
    except (httpx.HTTPError, OSError) as error:
        containers = f"  could not be listed: {error}"
    worker_lines = service.worker_log.read_text(errors="replace").splitlines()
    # arq prints "already running elsewhere" on every queue poll while the job runs, so those lines are dropped.
    interesting = [
        line
        for line in worker_lines
        if (deployment_id in line or "warning" in line.lower() or "error" in line.lower())
        and "already running elsewhere" not in line
    ]
    engine_lines = [
        line for line in daemon.log_tail(400).splitlines() if "level=error" in line or "level=warning" in line
    ]
    return (
        f"deployment {deployment_id}: status={body.get('status')} error={body.get('error')!r}\n"
        f"events:\n{events}\n"
        f"containers of project {project} on the private engine:\n{containers or '  none'}\n"
        f"engine restarts: {daemon.restarts}\n"
        f"worker alive: {service.worker.poll() is None}\n"
        f"worker log (deployment, warnings, errors; last 60 lines):\n" + "\n".join(interesting[-60:]) + "\n"
        "private dockerd log (warnings and errors; last 15 lines):\n" + "\n".join(engine_lines[-15:])
    )


async def wait_for_recovery(
    daemon: PrivateDockerd, project: str, port: int, kept_deployment: str
) -> tuple[str | None, list[dict]]:
    """Poll until `port` serves v1 and only `kept_deployment` has containers, or RECOVERY_SECONDS pass."""
    deadline = time.monotonic() + RECOVERY_SECONDS
    while True:
        version = await served_version(port)
        others = [
            item for item in await project_containers(daemon, project)
            if item["Labels"].get(DEPLOYMENT_LABEL) != kept_deployment
        ]  # fmt: skip
        if (version == "v1" and not others) or time.monotonic() > deadline:
            return version, others
        await asyncio.sleep(0.5)


async def test_engine_restart_during_health_check(private_service, private_dockerd, private_project):
    client = private_service.client
    name = private_project["name"]
    port = free_port()
    body = {"project_id": private_project["id"], "port": 8080, "host_port": port, "strategy": "recreate"}

    first = await deploy(client, {**body, "image_ref": app_image("v1"), "healthcheck": HEALTH})
    first_done = await wait_for_status(client, first["id"], FINAL_STATES, timeout=120)
    assert first_done["status"] == "succeeded", first_done
    assert await served_version(port) == "v1"

    slow_v2 = {"image_ref": app_image("v2"), "environment": {"START_DELAY": START_DELAY_SECONDS}, "healthcheck": HEALTH}
    second = await deploy(client, {**body, **slow_v2})
    waiting = await wait_for_event(client, second["id"], "started", timeout=60)
    # The restart has to come while the worker waits for the health check, so v2 is started but not healthy.
    assert waiting["status"] == "in_progress", waiting
    assert "healthy" not in [event["stage"] for event in waiting["events"]], waiting

    timings = await asyncio.to_thread(private_dockerd.restart)
    engine_back = time.monotonic()

    try:
        second_done = await wait_for_status(client, second["id"], FINAL_STATES, timeout=FINAL_STATE_SECONDS)
    except AssertionError:
        details = await describe(private_service, private_dockerd, name, second["id"])
        raise AssertionError(
            f"v2 did not reach a final state within {FINAL_STATE_SECONDS} s of the engine restart {timings}:\n{details}"
        ) from None
    final_seconds = time.monotonic() - engine_back
    version, leftovers = await wait_for_recovery(private_dockerd, name, port, first["id"])
    details = await describe(private_service, private_dockerd, name, second["id"])
    print(f"engine restart {timings}; v2 final after {final_seconds:.1f} s; recovery checked after "
          f"{time.monotonic() - engine_back:.1f} s\n{details}")  # fmt: skip

    assert second_done["status"] in ("failed", "succeeded"), details
    assert private_service.worker.poll() is None, details
    assert version == "v1", f"127.0.0.1:{port} served {version!r} after {RECOVERY_SECONDS} s of polling, expected v1\n{details}"
    assert leftovers == [], f"containers of other deployments are left:\n{details}"

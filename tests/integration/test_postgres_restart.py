"""Stop a private PostgreSQL cluster while requests arrive: 503 with Retry-After, never 500, nothing lost.

The cluster is made with initdb in a temporary directory and listens on a port of its own, so
stopping it touches no database that other tests or other work on the machine use.
"""

import asyncio
import glob
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    ROOT,
    api_process,
    app_image,
    create_token,
    free_port,
    remove_project_objects,
    start_worker,
    stop_process,
)

pytestmark = pytest.mark.integration

HEALTH = {"type": "http", "path": "/cgi-bin/health", "interval": 0.2, "timeout": 1, "retries": 50}
FINAL = {"succeeded", "failed", "rolled_back", "cancelled", "superseded", "stopped"}
OUTAGE_SECONDS = 4


class PrivateCluster:
    """A PostgreSQL cluster of this test's own, run as the `postgres` user (initdb refuses root)."""

    def __init__(self, directory: Path) -> None:
        binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not binaries:
            pytest.fail("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin")
        self.bin = Path(binaries[-1])
        self.directory = directory
        self.data = directory / "data"
        self.port = free_port()

    def _run(self, *command: str) -> None:
        result = subprocess.run(
            ["runuser", "-u", "postgres", "--", *command], capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {result.stdout}{result.stderr}")

    def create(self) -> None:
        self.directory.mkdir(parents=True)
        shutil.chown(self.directory, "postgres", "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.directory / "log"), "-w", "start")

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def create_database(self, name: str) -> None:
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)

    def url(self, name: str) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{name}"


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateCluster]:
    # The postgres user must reach the directory, so it lives under /tmp rather than root's pytest folder.
    directory = Path("/tmp") / f"jarvis-pg-{secrets.token_hex(4)}"
    private = PrivateCluster(directory)
    private.create()
    private.start()
    yield private
    try:
        private.stop()
    except RuntimeError:
        pass
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def private_service(cluster: PrivateCluster, service_env: dict[str, str], tmp_path: Path):
    """Migrations, an API process and a worker process on the private cluster, with a queue of their own."""
    cluster.create_database("jarvis")
    env = {
        **service_env,
        "JARVIS_DATABASE_URL": cluster.url("jarvis"),
        "JARVIS_QUEUE_NAME": f"jarvis-test-pg-{secrets.token_hex(4)}",
        "JARVIS_CADDY_ADMIN_URL": "",
    }
    subprocess.run(
        [sys.executable, "-m", "jarvis_deploy.cli", "migrate"], check=True, capture_output=True, env={**os.environ, **env}, cwd=ROOT
    )
    token = create_token(env, "pg-outage", ["admin"])
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        with api_process(env, tmp_path / "api.log") as url:
            yield url, token, worker
    finally:
        stop_process(worker)


async def wait_final(http: httpx.AsyncClient, deployment_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        response = await http.get(f"/api/jarvis/deployments/{deployment_id}")
        if response.status_code == 200:
            body = response.json()
            if body["status"] in FINAL:
                return body
        await asyncio.sleep(0.3)
    raise AssertionError(f"deployment {deployment_id} did not finish; last state: {body}")


async def test_postgres_stopped_while_requests_arrive(cluster, private_service, docker):
    url, token, worker = private_service
    headers = {"Authorization": f"Bearer {token}"}
    name = f"t{secrets.token_hex(5)}"
    port = free_port()
    statuses: Counter = Counter()
    missing_retry_after: list[str] = []
    accepted: list[str] = []
    ready_during_outage: list[dict] = []

    async with httpx.AsyncClient(base_url=url, headers=headers, trust_env=False, timeout=15) as http:
        project = (await http.post("/api/jarvis/projects", json={"name": name})).json()
        body = {"project_id": project["id"], "image_ref": app_image("v1"), "port": 8080, "host_port": port, "healthcheck": HEALTH}
        try:
            first = (await http.post("/api/jarvis/deployments/deploy", json=body)).json()
            assert (await wait_final(http, first["id"]))["status"] == "succeeded"

            stop = asyncio.Event()

            async def send_requests(index: int) -> None:
                number = 0
                while not stop.is_set():
                    number += 1
                    if number % 5 == 0:
                        request = {**body, "environment": {"REQUEST": f"{index}-{number}"}}
                        response = await http.post("/api/jarvis/deployments/deploy", json=request)
                        if response.status_code == 202:
                            accepted.append(response.json()["id"])
                    else:
                        response = await http.get(f"/api/jarvis/projects/{project['id']}/deployments")
                    statuses[response.status_code] += 1
                    if response.status_code == 503 and not response.headers.get("retry-after"):
                        missing_retry_after.append(response.text)
                    await asyncio.sleep(0.05)

            senders = [asyncio.create_task(send_requests(index)) for index in range(3)]
            await asyncio.sleep(1)
            await asyncio.to_thread(cluster.stop)
            ready = await http.get("/readyz")
            ready_during_outage.append({**ready.json(), "http_status": ready.status_code})
            await asyncio.sleep(OUTAGE_SECONDS)
            await asyncio.to_thread(cluster.start)
            await asyncio.sleep(2)
            stop.set()
            await asyncio.gather(*senders)

            assert statuses[503] > 0, statuses
            assert set(statuses) <= {200, 202, 503}, statuses
            assert not missing_retry_after
            assert ready_during_outage[0]["http_status"] == 503
            assert ready_during_outage[0]["checks"]["database"].startswith("down")
            assert worker.poll() is None

            # Every accepted deployment reaches a final state once the database is back, and a new one succeeds.
            for deployment_id in accepted:
                await wait_final(http, deployment_id, timeout=180)
            last = (await http.post("/api/jarvis/deployments/deploy", json={**body, "image_ref": app_image("v2")})).json()
            assert (await wait_final(http, last["id"]))["status"] == "succeeded"
            async with httpx.AsyncClient(trust_env=False) as app:
                assert (await app.get(f"http://127.0.0.1:{port}/cgi-bin/version")).text.strip() == "v2"
        finally:
            stop_requests = await http.get(f"/api/jarvis/projects/{project['id']}/deployments", params={"limit": 500})
            for item in stop_requests.json().get("items", []):
                if item["status"] == "queued":
                    await http.post(f"/api/jarvis/deployments/{item['id']}/cancel")
            for item in stop_requests.json().get("items", []):
                if item["status"] == "in_progress":
                    await wait_final(http, item["id"])
            await remove_project_objects(docker, name)

"""A private Caddy process for tests, on free loopback ports, started from a JSON config file.

The file configures the admin API, one HTTP server for the service's routes (SERVER_NAME) that
also contains another site and a catch-all route, and a second server with a site of its own. No
server uses TLS or automatic HTTPS, so Caddy requests no certificate for them. Changes made through
the admin API live only in memory (config persistence is off), so `restart()` brings Caddy back
with the file alone, as a real restart does. Each start checks that no other process listens on
the same ports.

Use from a fixture:

    with running_caddy(tmp_path) as caddy:
        yield caddy
"""

import asyncio
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

SERVER_NAME = "jarvis-test"
OTHER_SITE_HOST = "other-site.test"
OTHER_SITE_BODY = "other site"
FALLBACK_STATUS = 404
FALLBACK_BODY = "no site for this host"
SECOND_SERVER_NAME = "second-server"
SECOND_SERVER_BODY = "second server"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
# Starts that a first start may take, each on new ports, while a port turns out to be shared with another process.
START_ATTEMPTS = 3
# Requests per listener that check the listener is this process's. Caddy binds with SO_REUSEPORT on
# Linux, so a Caddy of another test run that bound the same port in the meantime gets a share of
# the connections instead of a bind error, and only some requests reach it.
OWNERSHIP_PROBES = 8
# Response header with a token of its own in each process, so that two processes started from the
# same ports tell their responses apart.
INSTANCE_HEADER = "X-Test-Caddy-Instance"


class PortCollision(RuntimeError):
    """A port of this Caddy is also bound by another process, which takes some of its connections."""


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """Return `count` distinct ports on 127.0.0.1 that were free a moment ago."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class CaddyProcess:
    """One `caddy run --config FILE` process. With `admin_only` the file configures no apps at all."""

    def __init__(self, directory: Path, *, admin_only: bool = False) -> None:
        executable = shutil.which("caddy")
        if executable is None:
            pytest.skip("caddy is not on PATH; install Caddy 2.6 or later (Debian package `caddy`) to run this test")
        self.executable = executable
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.admin_only = admin_only
        self.server_name = SERVER_NAME
        self.config_path = directory / "caddy.json"
        self.log_path = directory / "caddy.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.started_before = False
        self.instance = secrets.token_hex(8)
        self._choose_ports()

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def original_config(self) -> dict[str, Any]:
        # Without persistence Caddy writes no autosave.json, so nothing outlives the process.
        admin = {
            "@id": f"test-caddy-{self.instance}",
            "listen": f"127.0.0.1:{self.admin_port}",
            "config": {"persist": False},
        }
        config: dict[str, Any] = {"admin": admin}
        if self.admin_only:
            return config

        instance_headers = {INSTANCE_HEADER: [self.instance]}
        other_site = {
            "match": [{"host": [OTHER_SITE_HOST]}],
            "handle": [{"handler": "static_response", "headers": instance_headers, "body": OTHER_SITE_BODY}],
            "terminal": True,
        }
        # A route without a matcher takes every request that reaches it, so a route appended after it is never reached.
        fallback = {"handle": [{"handler": "static_response", "status_code": FALLBACK_STATUS, "body": FALLBACK_BODY}]}
        config["apps"] = {
            "http": {
                "servers": {
                    SERVER_NAME: {
                        "listen": [f"127.0.0.1:{self.http_port}"],
                        "automatic_https": {"disable": True},
                        "routes": [other_site, fallback],
                    },
                    SECOND_SERVER_NAME: {
                        "listen": [f"127.0.0.1:{self.second_http_port}"],
                        "automatic_https": {"disable": True},
                        "routes": [
                            {
                                "handle": [
                                    {"handler": "static_response", "headers": instance_headers, "body": SECOND_SERVER_BODY}
                                ]
                            }
                        ],
                    },
                }
            }
        }
        return config

    def start(self) -> None:
        """Start Caddy from the config file. The first start moves to new ports when a port is shared."""
        if self.process is not None:
            raise RuntimeError("this Caddy process is already running. Call stop() or restart() first")

        attempts = 1 if self.started_before else START_ATTEMPTS
        for attempt in range(1, attempts + 1):
            self._launch()
            try:
                self._check_ports_are_own()
            except PortCollision:
                self.stop()
                if attempt == attempts:
                    raise
                self._choose_ports()
                continue
            except BaseException:
                self.stop()
                raise
            self.started_before = True
            return

    def _choose_ports(self) -> None:
        self.admin_port, self.http_port, self.second_http_port = free_ports(3)
        self.config_path.write_text(json.dumps(self.original_config(), indent=2))

    def _launch(self) -> None:
        # Caddy keeps certificates, locks and autosaves under the XDG directories, so they go to
        # the test's directory instead of the home directory.
        environment = {
            **os.environ,
            "XDG_CONFIG_HOME": str(self.directory / "xdg-config"),
            "XDG_DATA_HOME": str(self.directory / "xdg-data"),
        }
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [self.executable, "run", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=environment,
                cwd=self.directory,
            )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise

    def restart(self) -> None:
        """Kill Caddy and start it again from the original file, so changes made through the API are gone."""
        self._end(kill=True)
        self.start()

    def stop(self) -> None:
        self._end(kill=False)

    def read_log(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def _end(self, *, kill: bool) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        if kill:
            process.kill()
        else:
            process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)

    def _wait_until_ready(self) -> None:
        """Wait until the admin API responds and every configured listener accepts connections."""
        ports = [self.admin_port] if self.admin_only else [self.admin_port, self.http_port, self.second_http_port]
        deadline = time.monotonic() + START_TIMEOUT
        with httpx.Client(trust_env=False, timeout=1.0) as client:
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"caddy exited with code {self.process.returncode} during start:\n{self.read_log()}"
                    )
                if self._admin_responds(client) and all(port_accepts(port) for port in ports):
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"caddy did not become ready within {START_TIMEOUT} s:\n{self.read_log()}")
                time.sleep(0.05)

    def _check_ports_are_own(self) -> None:
        """Raise PortCollision unless every probe of each listener gets this process's response."""
        expected_config = self.original_config()
        with httpx.Client(trust_env=False, timeout=5.0, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            for _ in range(OWNERSHIP_PROBES):
                response = client.get(f"{self.admin_url}/config/")
                if response.headers.get("content-type") != "application/json" or response.json() != expected_config:
                    raise PortCollision(
                        f"admin port {self.admin_port} is shared with another process: GET /config/ returned"
                        f" {response.text[:200]!r}"
                    )
                if self.admin_only:
                    continue
                for port, host, body in [
                    (self.http_port, OTHER_SITE_HOST, OTHER_SITE_BODY),
                    (self.second_http_port, "any.test", SECOND_SERVER_BODY),
                ]:
                    response = client.get(f"http://127.0.0.1:{port}/", headers={"Host": host})
                    if response.text != body or response.headers.get(INSTANCE_HEADER) != self.instance:
                        raise PortCollision(
                            f"HTTP port {port} is shared with another process: expected {body!r} from instance"
                            f" {self.instance}, got {response.status_code} {response.text[:200]!r} from instance"
                            f" {response.headers.get(INSTANCE_HEADER)}"
                        )

    def _admin_responds(self, client: httpx.Client) -> bool:
        try:
            return client.get(f"{self.admin_url}/config/").status_code == 200
        except httpx.TransportError:
            return False


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def start_caddy(directory: Path, *, admin_only: bool = False) -> CaddyProcess:
    """Start a Caddy process in `directory`, which the caller must stop(). Skips the test when `caddy` is missing."""
    caddy = CaddyProcess(directory, admin_only=admin_only)
    caddy.start()
    return caddy


@contextmanager
def running_caddy(directory: Path, *, admin_only: bool = False) -> Iterator[CaddyProcess]:
    """Start a Caddy process in `directory` and stop it on exit."""
    caddy = start_caddy(directory, admin_only=admin_only)
    try:
        yield caddy
    finally:
        caddy.stop()


async def route_upstreams(admin_url: str, route_id: str) -> list[str] | None:
    """Return the dial addresses that Caddy's route sends requests to, or None when Caddy has no such route.

    A route that names an upstream lookup lists no addresses, so the lookup is sent to its resolver.
    """
    from jarvis_deploy.proxy.lookup import query_addresses

    url = f"{admin_url}/id/{route_id}"
    async with httpx.AsyncClient(trust_env=False) as http:
        try:
            response = await http.get(url)
        except (httpx.ReadError, httpx.RemoteProtocolError, httpx.ConnectError):
            # Caddy restarts its admin endpoint after every configuration change; ask once more.
            await asyncio.sleep(0.1)
            response = await http.get(url)
    if response.status_code == 404:
        return None
    response.raise_for_status()

    handler = response.json()["handle"][0]
    lookup = handler.get("dynamic_upstreams")
    if lookup is None:
        return [upstream["dial"] for upstream in handler.get("upstreams", [])]
    resolver = lookup["resolver"]["addresses"][0].removeprefix("udp/")
    addresses = await query_addresses(resolver, lookup["name"]) or []
    return [f"{address}:{lookup['port']}" for address in addresses]


"""A private Caddy process for tests, on free loopback ports, started from a JSON config file.

The file configures the admin API, one HTTP server for the service's routes (SERVER_NAME) that
also holds another site and a catch-all route, and a second server with a site of its own. No
server uses TLS or automatic HTTPS, so Caddy never requests a certificate. Changes made through
the admin API live only in memory (config persistence is off), so `restart()` brings Caddy back
with the file alone, as a real restart does.

Use from a fixture:

    with running_caddy(tmp_path) as caddy:
        yield caddy
"""

import json
import os
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CaddyProcess:
    """One `caddy run --config FILE` process; `admin_only` writes a file with no apps at all."""

    def __init__(self, directory: Path, *, admin_only: bool = False) -> None:
        executable = shutil.which("caddy")
        if executable is None:
            pytest.skip("caddy is not on PATH; install Caddy 2.6 or later (Debian package `caddy`) to run this test")
        self.executable = executable
        self.directory = directory
        self.admin_only = admin_only
        self.admin_port = free_port()
        self.http_port = free_port()
        self.second_http_port = free_port()
        self.server_name = SERVER_NAME
        self.config_path = directory / "caddy.json"
        self.log_path = directory / "caddy.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.config_path.write_text(json.dumps(self.original_config(), indent=2))

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def original_config(self) -> dict[str, Any]:
        # Without persistence Caddy writes no autosave.json, so nothing outlives the process.
        config: dict[str, Any] = {"admin": {"listen": f"127.0.0.1:{self.admin_port}", "config": {"persist": False}}}
        if self.admin_only:
            return config

        other_site = {
            "match": [{"host": [OTHER_SITE_HOST]}],
            "handle": [{"handler": "static_response", "body": OTHER_SITE_BODY}],
            "terminal": True,
        }
        # A route without matcher takes every request that reaches it, as many operators configure.
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
                        "routes": [{"handle": [{"handler": "static_response", "body": SECOND_SERVER_BODY}]}],
                    },
                }
            }
        }
        return config

    def start(self) -> None:
        if self.process is not None:
            raise RuntimeError("this Caddy process is already running; call stop() or restart()")

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
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

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
    """Start a Caddy process in `directory`; the caller must call stop(). Skips the test without `caddy`."""
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

"""Schemathesis fuzz run against the API's own OpenAPI document, with the real database, Redis and Docker behind it.

The API runs as a separate process on a free loopback port with an admin token. It has a database
and an arq queue of its own. No worker reads that queue, so a fuzzed deploy request that passes
validation stays `queued` and starts no container. The database is separate because the other
tests' worker requeues every `queued` deployment it finds in its database into its own queue.

JARVIS_FUZZ_MAX_EXAMPLES sets the test cases schemathesis generates per operation and phase, and
JARVIS_FUZZ_SEED its seed. docs/testing.md describes the full-size run and records its figures.
"""

import asyncio
import json
import os
import re
import secrets
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import ROOT, _drop_database, api_process, create_token

pytestmark = pytest.mark.integration

MAX_EXAMPLES = int(os.environ.get("JARVIS_FUZZ_MAX_EXAMPLES", "25"))
SEED = int(os.environ.get("JARVIS_FUZZ_SEED", "20240601"))
# The run's length grows with MAX_EXAMPLES (182 s for 1000 on a 2-core machine), so the timeout does too.
TIMEOUT_SECONDS = max(300, MAX_EXAMPLES * 3)

# Schemathesis configuration: four checks on every operation.
CONFIG = """
[checks]
enabled = false
not_a_server_error.enabled = true
response_schema_conformance.enabled = true
status_code_conformance.enabled = true
content_type_conformance.enabled = true
"""
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


@pytest.fixture(scope="module")
def fuzz_env(service_env: dict[str, str], run_id: str) -> Iterator[dict[str, str]]:
    """service_env with a database and a queue name of their own; both are removed afterwards."""
    database = f"jarvis_fuzz_{run_id}"
    env = {
        **service_env,
        "JARVIS_DATABASE_URL": f"postgresql+asyncpg://postgres@127.0.0.1:5432/{database}",
        "JARVIS_QUEUE_NAME": f"jarvis-fuzz-{run_id}",
        "JARVIS_LOG_LEVEL": "WARNING",
    }
    subprocess.run(
        [sys.executable, "-m", "jarvis_deploy.cli", "migrate"],
        check=True,
        capture_output=True,
        env={**os.environ, **env},
        cwd=ROOT,
    )
    yield env
    _remove_queue(env["JARVIS_REDIS_URL"], env["JARVIS_QUEUE_NAME"])
    asyncio.run(_drop_database(database))


def _remove_queue(redis_url: str, queue_name: str) -> None:
    """Delete the queue's sorted set and the arq job records it points to."""
    client = redis.Redis.from_url(redis_url)
    try:
        job_ids = [job_id.decode() for job_id in client.zrange(queue_name, 0, -1)]
        keys = [f"arq:job:{job_id}" for job_id in job_ids] + [queue_name]
        client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(scope="module")
def api_url(fuzz_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of an API process started with `jarvis-deploy api`, stopped at the end."""
    log_path = tmp_path_factory.mktemp("fuzz-api") / "api.log"
    with api_process(fuzz_env, log_path) as url:
        yield url
    print(f"API log: {log_path}")


def _operation_matchers(schema: dict) -> list[tuple[str, str, re.Pattern[str]]]:
    """(method, path template, regex) for every operation, to map a request URL back to its operation."""
    matchers = []
    for template, operations in schema["paths"].items():
        parts = re.split(r"\{[^}]+\}", template)
        pattern = re.compile("^" + "[^/]*".join(re.escape(part) for part in parts) + "$")
        for method in operations:
            matchers.append((method.upper(), template, pattern))
    return matchers


def _count_requests(har_path: Path, schema: dict) -> tuple[Counter[str], Counter[str]]:
    """Requests and 2xx responses per operation ("METHOD /path/{param}") recorded in a HAR report.

    Requests with a method that the path does not declare (schemathesis's unsupported-method
    probes) are counted under one name.
    """
    matchers = _operation_matchers(schema)
    requests: Counter[str] = Counter()
    successes: Counter[str] = Counter()
    for entry in json.loads(har_path.read_text())["log"]["entries"]:
        method = entry["request"]["method"]
        path = httpx.URL(entry["request"]["url"]).path
        names = [f"{method} {template}" for m, template, pattern in matchers if m == method and pattern.match(path)]
        name = names[0] if names else "(method not declared for the path)"
        requests[name] += 1
        if 200 <= entry["response"]["status"] < 300:
            successes[name] += 1
    return requests, successes


@pytest.mark.timeout(TIMEOUT_SECONDS)
def test_openapi_fuzz_finds_nothing(api_url: str, fuzz_env: dict[str, str], tmp_path: Path):
    token = create_token(fuzz_env, f"fuzz-admin-{secrets.token_hex(3)}", ["admin"])
    schema = httpx.get(f"{api_url}/openapi.json", timeout=10).json()
    config_path = tmp_path / "schemathesis.toml"
    config_path.write_text(CONFIG)
    junit_path = tmp_path / "junit.xml"
    har_path = tmp_path / "requests.har"
    command = [
        str(SCHEMATHESIS),
        "--config-file",
        str(config_path),
        "run",
        f"{api_url}/openapi.json",
        "--header",
        f"Authorization: Bearer {token}",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--workers",
        "2",
        "--continue-on-failure",
        "--generation-database",
        "none",
        "--request-timeout",
        "30",
        "--report",
        "junit,har",
        "--report-junit-path",
        str(junit_path),
        "--report-har-path",
        str(har_path),
        "--no-color",
    ]

    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    duration = time.monotonic() - started

    output = result.stdout + result.stderr
    assert har_path.exists(), output
    requests, successes = _count_requests(har_path, schema)
    print(f"\nschemathesis {MAX_EXAMPLES} max examples, seed {SEED}, {duration:.0f} s; requests (2xx) per operation:")
    for name, count in sorted(requests.items()):
        print(f"  {count:6d} ({successes[name]:5d})  {name}")
    print(f"  {requests.total():6d} ({successes.total():5d})  total")

    junit = ElementTree.parse(junit_path).getroot()
    failed = [case.get("name") for case in junit.iter("testcase") if case.find("failure") is not None]
    errored = [case.get("name") for case in junit.iter("testcase") if case.find("error") is not None]
    assert failed == [], output
    assert errored == [], output
    assert result.returncode == 0, output

    # A fuzzed DELETE /api/jarvis/tokens/{id} must not have revoked the run's own token, or most
    # requests would have stopped at 401.
    check = httpx.get(f"{api_url}/api/jarvis/tokens", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert check.status_code == 200, check.text

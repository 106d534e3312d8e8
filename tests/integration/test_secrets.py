"""Secrets end to end: the container sees the value, and the API, the database and the logs never do."""

import asyncio
import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
import yaml
from cryptography.fernet import Fernet
from pydantic import SecretStr

from jarvis_deploy.api.app import create_app
from jarvis_deploy.compose.render import validate_document
from jarvis_deploy.config import Settings
from jarvis_deploy.db.models import ComposeSpec, Project, SpecSecret
from jarvis_deploy.db.session import create_engine, create_sessionmaker
from jarvis_deploy.secrets.cipher import (
    PLACEHOLDER_PREFIX,
    SecretCipher,
    SecretKeyInvalid,
)
from jarvis_deploy.secrets.store import SecretKeyMismatch, check_secret_key
from tests.conftest import (
    ROOT,
    _drop_database,
    api_client,
    app_image,
    create_token,
    free_port,
    wait_for_status,
)
from tests.integration.test_deploy_flow import HEALTH, containers_of, deploy

pytestmark = pytest.mark.integration


def secret_value() -> str:
    return "s3cr3t-" + secrets.token_hex(16)


def plain_url(database_url: str) -> str:
    return database_url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def database_rows_containing(database_url: str, needle: str) -> list[str]:
    """Return `table: row` for every row of every table in the public schema whose text contains `needle`."""
    connection = await asyncpg.connect(plain_url(database_url))
    try:
        tables = await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        assert len(tables) >= 5, tables
        found = []
        for table in tables:
            name = table["tablename"]
            for row in await connection.fetch(f'SELECT t::text AS row FROM "{name}" t'):
                if needle in row["row"]:
                    found.append(f"{name}: {row['row'][:200]}")
        return found
    finally:
        await connection.close()


async def read_env(port: int, name: str) -> bytes:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{port}/cgi-bin/env?{name}")
    assert response.status_code == 200, response.text
    return response.content


@pytest.mark.usefixtures("worker")
async def test_secret_reaches_container_only(client, project, docker, database_url, worker_log: Path, capfd):
    first_value = secret_value()
    second_value = secret_value()
    responses: list[httpx.Response] = []

    async def keep(response: httpx.Response) -> None:
        await response.aread()
        responses.append(response)

    client.event_hooks["response"].append(keep)
    try:
        port = free_port()
        fields = {"image_ref": app_image("v1"), "host_port": port, "healthcheck": HEALTH}
        fields["environment"] = {"PLAIN": "visible"}

        first = await deploy(client, project, **fields, secrets={"API_TOKEN": first_value})
        done = await wait_for_status(client, first["id"], {"succeeded", "failed"})
        assert done["status"] == "succeeded", done
        assert await read_env(port, "API_TOKEN") == first_value.encode()
        assert await read_env(port, "PLAIN") == b"visible"

        # docker inspect shows the real value; that is where it has to be.
        container = (await containers_of(docker, project["name"]))[0]
        assert f"API_TOKEN={first_value}" in (await container.show())["Config"]["Env"]

        stored = (await client.get(f"/api/jarvis/deployments/{first['id']}/compose")).text
        document = yaml.safe_load(stored)
        validate_document(document)
        placeholder = document["services"][project["name"]]["environment"]["API_TOKEN"]
        assert placeholder.startswith(PLACEHOLDER_PREFIX)

        # A changed value gives a new checksum, and the new container sees the new value.
        second = await deploy(client, project, **fields, secrets={"API_TOKEN": second_value})
        assert second["checksum"] != first["checksum"]
        done = await wait_for_status(client, second["id"], {"succeeded", "failed"})
        assert done["status"] == "succeeded", done
        assert await read_env(port, "API_TOKEN") == second_value.encode()

        # The same value again reuses the stored spec and its ciphertext.
        third = await deploy(client, project, **fields, secrets={"API_TOKEN": second_value})
        assert third["checksum"] == second["checksum"]
        done = await wait_for_status(client, third["id"], {"succeeded", "failed"})
        assert done["status"] == "succeeded", done
        assert await read_env(port, "API_TOKEN") == second_value.encode()

        for deployment in (first, second, third):
            await client.get(f"/api/jarvis/deployments/{deployment['id']}")
            await client.get(f"/api/jarvis/deployments/{deployment['id']}/compose")
            await client.get(f"/api/jarvis/deployments/{deployment['id']}/logs", params={"tail": 100})
        await client.get("/api/jarvis/deployments", params={"project_id": project["id"]})
    finally:
        client.event_hooks["response"].remove(keep)

    assert len(responses) > 10
    worker_output = worker_log.read_bytes()
    assert first["id"].encode() in worker_output, "the worker log does not cover this test's deployments"
    captured = capfd.readouterr()
    for value in (first_value, second_value):
        for response in responses:
            assert value.encode() not in response.content, f"{response.request.method} {response.request.url}"
            assert value not in str(response.headers)
        assert await database_rows_containing(database_url, value) == []
        assert value.encode() not in worker_output
        assert value not in captured.out
        assert value not in captured.err

    assert await database_rows_containing(database_url, placeholder) != [], "the row search finds nothing at all"


async def test_validation_errors_omit_secret(client, project, capfd):
    value = secret_value()
    bodies = {
        "not a string": {"secrets": {"API_TOKEN": [value]}},
        "NUL": {"secrets": {"API_TOKEN": value + "\x00"}},
        "too long": {"secrets": {"API_TOKEN": value * 2000}},
        "key in both": {"environment": {"API_TOKEN": value}, "secrets": {"API_TOKEN": value}},
        "other field": {"port": 0, "secrets": {"API_TOKEN": value}},
        "unknown field": {"secret": {"API_TOKEN": value}},
    }
    for case, fields in bodies.items():
        body = {"project_id": project["id"], "image_ref": app_image("v1"), "port": 8080, **fields}
        response = await client.post("/api/jarvis/deployments/deploy", json=body)

        assert response.status_code == 422, (case, response.text)
        assert response.json()["errors"], case
        assert value not in response.text, case

    captured = capfd.readouterr()
    assert value not in captured.out
    assert value not in captured.err


@pytest.fixture(scope="module")
def empty_database_url(run_id: str) -> Iterator[str]:
    """A second migrated database, so start-up checks see a known set of stored secrets."""
    name = f"jarvis_test_{run_id}_secrets"
    url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    env = {**os.environ, "JARVIS_DATABASE_URL": url}
    subprocess.run([sys.executable, "-m", "jarvis_deploy.cli", "migrate"], check=True, env=env, cwd=ROOT)
    yield url
    asyncio.run(_drop_database(name))


@pytest.fixture
async def empty_sessionmaker(empty_database_url: str) -> AsyncIterator:
    engine = create_engine(empty_database_url)
    yield create_sessionmaker(engine)
    await engine.dispose()


def settings_for(service_env: dict[str, str], database_url: str, secret_key: str | None) -> Settings:
    env = {**service_env, "JARVIS_DATABASE_URL": database_url, "JARVIS_QUEUE_NAME": f"unused-{uuid.uuid4().hex}"}
    values = {key.removeprefix("JARVIS_").lower(): value for key, value in env.items()}
    values["secret_key"] = secret_key
    return Settings(**values)


async def test_deploy_without_key_is_503(service_env, empty_database_url):
    settings = settings_for(service_env, empty_database_url, None)
    token = create_token({**service_env, "JARVIS_DATABASE_URL": empty_database_url}, "no-key-admin", ["admin"])
    value = secret_value()
    app = create_app(settings)

    async with app.router.lifespan_context(app), api_client(app, token) as http:
        created = await http.post("/api/jarvis/projects", json={"name": f"t{secrets.token_hex(5)}"})
        assert created.status_code == 201, created.text
        body = {
            "project_id": created.json()["id"],
            "image_ref": app_image("v1"),
            "port": 8080,
            "secrets": {"API_TOKEN": value},
        }
        response = await http.post("/api/jarvis/deployments/deploy", json=body)

    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["type"].endswith("/secrets-not-configured")
    assert "JARVIS_SECRET_KEY" in response.json()["detail"]
    assert value not in response.text
    assert await database_rows_containing(empty_database_url, value) == []


async def test_startup_check_with_stored_secret(service_env, empty_database_url, empty_sessionmaker):
    key = Fernet.generate_key().decode()
    wrong_key = Fernet.generate_key().decode()
    value = secret_value()
    project_id = uuid.uuid4()
    async with empty_sessionmaker() as session:
        session.add(Project(id=project_id, name=f"t{secrets.token_hex(5)}"))
        await session.flush()
        spec = ComposeSpec(project_id=project_id, checksum=secrets.token_hex(32), yaml="services: {}\n")
        session.add(spec)
        await session.flush()
        ciphertext = SecretCipher(SecretStr(key)).encrypt(value)
        session.add(SpecSecret(spec_id=spec.id, name="API_TOKEN", ciphertext=ciphertext))
        await session.commit()

    try:
        assert await check_secret_key(empty_sessionmaker, SecretStr(key)) == 1

        with pytest.raises(SecretKeyMismatch) as missing:
            await check_secret_key(empty_sessionmaker, None)
        assert "JARVIS_SECRET_KEY is not set" in str(missing.value)

        with pytest.raises(SecretKeyMismatch) as wrong:
            await check_secret_key(empty_sessionmaker, SecretStr(wrong_key))
        assert "cannot decrypt 1 of the 1 stored" in str(wrong.value)
        assert "'API_TOKEN'" in str(wrong.value)
        assert value not in str(wrong.value)
        assert wrong_key not in str(wrong.value)

        with pytest.raises(SecretKeyInvalid):
            await check_secret_key(empty_sessionmaker, SecretStr("not-a-fernet-key"))

        # The API lifespan runs the same check and does not start.
        app = create_app(settings_for(service_env, empty_database_url, wrong_key))
        with pytest.raises(SecretKeyMismatch):
            async with app.router.lifespan_context(app):
                pass
    finally:
        async with empty_sessionmaker() as session:
            await session.delete(await session.get(Project, project_id))
            await session.commit()

    assert await check_secret_key(empty_sessionmaker, None) == 0

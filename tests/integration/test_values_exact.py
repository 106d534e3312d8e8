"""Values reach the container exactly as sent: the stored YAML, docker-compose and docker inspect agree."""

import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from jarvis_deploy.compose.render import validate_document
from tests.conftest import app_image, free_port, wait_for_status
from tests.integration.test_deploy_flow import HEALTH, containers_of, deploy

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("worker")]

PEM = "-----BEGIN PRIVATE KEY-----\nMIIBVQIBADANBgkqhkiG9w0BAQEFAASCAT8wggE7AgEAAkEA\nq7BFUpkGp3+Xj0==\n-----END PRIVATE KEY-----\n"
TRICKY = {
    "DB_PASSWORD": "abc$def",
    "CONNECTION": "Server=db;Password=123#abc;",
    "FLAG_YES": "yes",
    "FLAG_OFF": "off",
    "FLAG_TRUE": "true",
    "OCTAL_ISH": "0123",
    "VERSION_FLOAT": "24.10",
    "MODE": "0755",
    "TILDE": "~",
    "NULL_WORD": "null",
    "EXPONENT": "1e3",
    "DOUBLE_DOLLAR": "$$kept",
    "BRACES": "${NOT_INTERPOLATED}",
    "PRIVATE_KEY": PEM,
    "spring.profiles.active": "prod",
    "services__storage-service__http__0": "http://storage:8080",
    "EMPTY": "",
    "UNICODE": "grüße ✓",
}


def _docker_env(env_list: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in env_list)


async def test_values_reach_container_byte_for_byte(client, project, docker, tmp_path: Path):
    port = free_port()
    data_dir = tmp_path / "dir with: colon"
    data_dir.mkdir()
    (data_dir / "marker").write_text("bound")

    accepted = await deploy(
        client,
        project,
        image_ref=app_image("v1"),
        host_port=port,
        healthcheck=HEALTH,
        environment=TRICKY,
        volumes=[{"source": "data", "target": "/data"}, {"source": str(data_dir), "target": "/mnt/host", "read_only": True}],
    )
    done = await wait_for_status(client, accepted["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done

    # The stored YAML is valid Compose.
    stored = (await client.get(f"/api/jarvis/deployments/{accepted['id']}/compose")).text
    validate_document(yaml.safe_load(stored))

    # docker inspect: the environment contains each value exactly.
    container = (await containers_of(docker, project["name"]))[0]
    info = await container.show()
    env = _docker_env(info["Config"]["Env"])
    for key, value in TRICKY.items():
        assert env[key] == value, key

    # The app itself reads the same bytes.
    async with httpx.AsyncClient() as http:
        for key in ("DB_PASSWORD", "MODE", "DOUBLE_DOLLAR", "BRACES", "PRIVATE_KEY", "UNICODE"):
            response = await http.get(f"http://127.0.0.1:{port}/cgi-bin/env?{key}")
            assert response.content == TRICKY[key].encode(), key

    mounts = {mount["Destination"]: mount for mount in info["Mounts"]}
    assert mounts["/data"]["Name"] == f"{project['name']}_data"
    assert mounts["/mnt/host"]["Source"] == str(data_dir)
    assert mounts["/mnt/host"]["RW"] is False
    bindings = info["HostConfig"]["PortBindings"]["8080/tcp"]
    assert bindings == [{"HostIp": "127.0.0.1", "HostPort": str(port)}]

    # docker-compose (1.29, the reference reader) reads back the same values.
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed; scripts/services.sh --test installs it")
    compose_file = tmp_path / "compose.yml"
    compose_file.write_text(stored)
    output = subprocess.run(
        ["docker-compose", "-p", project["name"], "-f", str(compose_file), "config", "--no-interpolate"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    service = yaml.safe_load(output)["services"][project["name"]]
    # With --no-interpolate the output keeps the file's `$$` escapes; undo them once, as Compose does.
    compose_env = {key: value.replace("$$", "$") for key, value in service["environment"].items()}
    assert compose_env == TRICKY
    labels = info["Config"]["Labels"]
    for key, value in (service.get("labels") or {}).items():
        assert labels[key] == value
    compose_ports = json.dumps(service["ports"])
    assert str(port) in compose_ports
    assert {volume["target"] for volume in service["volumes"]} == {"/data", "/mnt/host"}

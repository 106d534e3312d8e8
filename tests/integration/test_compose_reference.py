"""Read rendered documents back with docker-compose 1.29 as an independent Compose implementation.

`docker-compose config` only parses, interpolates and prints the file, so these tests create
no containers, networks or volumes and need no Docker daemon.
"""

import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from jarvis_deploy.compose.render import RenderOptions, render, unescape_document
from jarvis_deploy.deployments.schemas import DeployRequest

pytestmark = pytest.mark.integration

DOCKER_COMPOSE = shutil.which("docker-compose")
PEM_KEY = (
    "-----BEGIN PRIVATE KEY-----\n"
    "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj\n"
    "MzEfYyjiWA4R4/M2bS1GB4t7NXp98C3SC6dVMvDuictGeurT8jNbvJZHtCSuYEvu\n"
    "+/=$$x\n"
    "-----END PRIVATE KEY-----\n"
)
TRICKY_ENVIRONMENT = {
    "DB_PASSWORD": "abc$def",
    "CONNECTION_STRING": "Server=db;Password=123#abc;",
    "BOOL_YES": "yes",
    "BOOL_OFF": "off",
    "BOOL_TRUE": "true",
    "OCTAL_LIKE": "0123",
    "VERSION": "24.10",
    "FILE_MODE": "0755",
    "TILDE": "~",
    "NULL_WORD": "null",
    "EXPONENT": "1e3",
    "PRIVATE_KEY": PEM_KEY,
    "spring.profiles.active": "production",
    "services__storage-service__http__0": "http://storage:8080",
    "ALREADY_ESCAPED": "$$already",
    "BRACED": "${HOME}",
    "EMPTY": "",
    "QUOTES": "say \"hi\" and 'bye'",
    "BACKSLASH": "C:\\path\\",
    "TAB": "a\tb",
    "SPACES": "  padded  ",
    "COLON_SPACE": "key: value",
    "UNICODE": "bücher ✓",
}
VOLUMES = [
    {"source": "data", "target": "/var/lib/data"},
    {"source": "/srv/my files:2024", "target": "/import", "read_only": True},
]

requires_docker_compose = pytest.mark.skipif(
    DOCKER_COMPOSE is None, reason="docker-compose is not on PATH; install docker-compose 1.29 to run this test"
)


def build_request(**changes: Any) -> DeployRequest:
    data: dict[str, Any] = {
        "project_id": "0b7c6f0e-3f0c-4c59-9a59-2d8f8e7f4a10",
        "image_ref": "localhost:5000/testapp:v1",
        "port": 8080,
        "environment": TRICKY_ENVIRONMENT,
        "volumes": VOLUMES,
        "networks": ["backend"],
    }
    data.update(changes)
    return DeployRequest.model_validate(data)


def compose_config(tmp_path: Path, request: DeployRequest, options: RenderOptions) -> tuple[str, dict[str, Any]]:
    """Render the request, run `docker-compose config` on it and return the project name and parsed output."""
    assert DOCKER_COMPOSE is not None
    project = f"jdref{secrets.token_hex(4)}"
    spec = render(request, project, options)
    compose_file = tmp_path / "compose.yaml"
    compose_file.write_text(spec.yaml, encoding="utf-8")

    result = subprocess.run(
        [DOCKER_COMPOSE, "-p", project, "-f", str(compose_file), "config"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"docker-compose config failed: {result.stderr}"
    output = yaml.safe_load(result.stdout)
    # docker-compose writes each `$` of the interpolated result as `$$` again, so undo that once.
    return project, unescape_document(output)


def port_mapping(entry: str | dict[str, Any]) -> tuple[str, int, int, str]:
    """Return (host IP, published port, target port, protocol) of a port in either form docker-compose prints.

    docker-compose 1.29 prints `{published, target}` when no host IP is set and `IP:PUBLISHED:TARGET/PROTOCOL` otherwise.
    """
    if isinstance(entry, dict):
        return entry.get("host_ip", ""), int(entry["published"]), int(entry["target"]), entry.get("protocol", "tcp")
    mapping, _, protocol = entry.partition("/")
    host_ip, published, target = mapping.rsplit(":", 2)
    return host_ip, int(published), int(target), protocol or "tcp"


@requires_docker_compose
@pytest.mark.parametrize("publish_host_ip", ["", "127.0.0.1", "::1"])
def test_compose_reads_no_domain_variant(tmp_path: Path, publish_host_ip: str) -> None:
    request = build_request(host_port=18080)
    options = RenderOptions(proxy_network="caddy", publish_host_ip=publish_host_ip)

    project, config = compose_config(tmp_path, request, options)
    service = config["services"][project]

    assert service["environment"] == TRICKY_ENVIRONMENT
    assert service["image"] == "localhost:5000/testapp:v1"
    assert [port_mapping(port) for port in service["ports"]] == [(publish_host_ip, 18080, 8080, "tcp")]
    assert "labels" not in service
    assert sorted(service["networks"]) == ["backend", "default"]
    assert config["networks"]["default"] == {"name": f"{project}_default"}
    assert config["networks"]["backend"] == {"name": "backend"}


@requires_docker_compose
def test_compose_reads_domain_variant(tmp_path: Path) -> None:
    request = build_request(domain=["b.example.com", "Bücher.example", "*.example.org"], replicas=2)
    options = RenderOptions(proxy_network="caddy")

    project, config = compose_config(tmp_path, request, options)
    service = config["services"][project]

    assert service["environment"] == TRICKY_ENVIRONMENT
    assert service["labels"] == {
        "caddy": "*.example.org, b.example.com, xn--bcher-kva.example",
        "caddy.reverse_proxy": "{{upstreams 8080}}",
    }
    assert "ports" not in service
    assert sorted(service["networks"]) == ["backend", "caddy", "default"]
    assert config["networks"]["caddy"] == {"name": "caddy", "external": True}


@requires_docker_compose
def test_compose_reads_mounts(tmp_path: Path) -> None:
    project, config = compose_config(tmp_path, build_request(), RenderOptions(proxy_network="caddy"))
    service = config["services"][project]

    assert service["volumes"] == [
        {"type": "bind", "source": "/srv/my files:2024", "target": "/import", "read_only": True},
        {"type": "volume", "source": "data", "target": "/var/lib/data"},
    ]
    assert config["volumes"] == {"data": {"name": f"{project}_data"}}

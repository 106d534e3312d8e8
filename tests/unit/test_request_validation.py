from typing import Any

import pytest
from pydantic import ValidationError

from jarvis_deploy.deployments.schemas import DeployRequest

BASE_REQUEST: dict[str, Any] = {
    "project_id": "0b7c6f0e-3f0c-4c59-9a59-2d8f8e7f4a10",
    "image_ref": "localhost:5000/testapp:v1",
    "port": 8080,
}


def build_request(**changes: Any) -> dict[str, Any]:
    return {**BASE_REQUEST, **changes}


@pytest.mark.parametrize(
    ("changes", "expected_loc", "message"),
    [
        ({"port": 0}, ("port",), "greater than or equal to 1"),
        ({"port": 65536}, ("port",), "less than or equal to 65535"),
        ({"host_port": 0}, ("host_port",), "greater than or equal to 1"),
        ({"host_port": 65536}, ("host_port",), "less than or equal to 65535"),
        ({"image_ref": "MyApp"}, ("image_ref",), "must be lowercase"),
        ({"image_ref": "app:"}, ("image_ref",), "empty tag"),
        ({"image_ref": ""}, ("image_ref",), "empty"),
        ({"domain": "http://app.example.com"}, ("domain",), "URL scheme"),
        ({"domain": ["app.example.com", "my_app.example.com"]}, ("domain",), "'_'"),
        ({"domain": "127.0.0.1"}, ("domain",), "IP address"),
        ({"environment": {"A=B": "x"}}, ("environment", "A=B", "[key]"), "must not contain '='"),
        ({"environment": {"A\nB": "x"}}, ("environment", "A\nB", "[key]"), "control characters"),
        ({"environment": {"": "x"}}, ("environment", "", "[key]"), "at least 1 character"),
        ({"environment": {"FLAG": True}}, ("environment", "FLAG"), "valid string"),
        ({"environment": {"COUNT": 3}}, ("environment", "COUNT"), "valid string"),
        ({"environment": {"EMPTY": None}}, ("environment", "EMPTY"), "valid string"),
        ({"environment": {"NUL": "a\x00b"}}, ("environment",), "'NUL' must not contain NUL"),
        ({"volumes": [{"source": "./data", "target": "/data"}]}, ("volumes", 0, "source"), "absolute path"),
        ({"volumes": [{"source": "data/sub", "target": "/data"}]}, ("volumes", 0, "source"), "absolute path"),
        ({"volumes": [{"source": "-bad", "target": "/data"}]}, ("volumes", 0, "source"), "volume name"),
        ({"volumes": [{"source": "data", "target": "data"}]}, ("volumes", 0, "target"), "absolute path"),
        ({"volumes": [{"source": "data", "target": "/d", "mode": "ro"}]}, ("volumes", 0, "mode"), "Extra inputs"),
        ({"networks": ["default"]}, ("networks",), "'default' is the project's own network"),
        ({"networks": ["-bad"]}, ("networks",), "'-bad' must match"),
        ({"healthcheck": {"path": "healthz"}}, ("healthcheck", "path"), "must start with '/'"),
        ({"strategy": "canary"}, ("strategy",), "'recreate', 'rolling' or 'blue-green'"),
        ({"strategy": "blue-green"}, ("strategy",), "blue-green needs a domain"),
        ({"strategy": "rolling", "host_port": 8080}, ("strategy",), "rolling needs a domain"),
        ({"replicas": 0}, ("replicas",), "greater than or equal to 1"),
        ({"unknown": 1}, ("unknown",), "Extra inputs are not permitted"),
    ],
)
def test_deploy_request_invalid_field(changes: dict[str, Any], expected_loc: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        DeployRequest.model_validate(build_request(**changes))

    errors = caught.value.errors()
    assert len(errors) == 1
    assert errors[0]["loc"] == expected_loc
    assert message in errors[0]["msg"]


def test_deploy_request_replicas_need_domain() -> None:
    with pytest.raises(ValidationError) as caught:
        DeployRequest.model_validate(build_request(replicas=2))

    errors = caught.value.errors()
    assert len(errors) == 1
    assert errors[0]["loc"] == ("replicas",)
    assert "needs a domain" in errors[0]["msg"]


def test_deploy_request_duplicate_mount_target() -> None:
    volumes = [{"source": "a", "target": "/data"}, {"source": "/srv/b", "target": "/data"}]

    with pytest.raises(ValidationError) as caught:
        DeployRequest.model_validate(build_request(volumes=volumes))

    assert "'/data' is mounted more than once" in caught.value.errors()[0]["msg"]


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("App.Example.com", ["app.example.com"]),
        (["b.example.com", "a.example.com", "B.example.com."], ["a.example.com", "b.example.com"]),
        ("bücher.example", ["xn--bcher-kva.example"]),
        ("*.example.com", ["*.example.com"]),
        ([], []),
        (None, []),
    ],
)
def test_deploy_request_normalizes_domains(domain: Any, expected: list[str]) -> None:
    request = DeployRequest.model_validate(build_request(domain=domain))

    assert request.domains == expected


def test_deploy_request_replicas_with_domain() -> None:
    request = DeployRequest.model_validate(build_request(replicas=3, domain="app.example.com"))

    assert request.replicas == 3


def test_deploy_request_keeps_environment_verbatim() -> None:
    environment = {"PASSWORD": "abc$def", "spring.profiles.active": "prod", "EMPTY": "", "PEM": "a\nb\n"}

    request = DeployRequest.model_validate(build_request(environment=environment))

    assert request.environment == environment

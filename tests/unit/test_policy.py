from typing import Any

import pytest
from pydantic import ValidationError

from jarvis_deploy import policy
from jarvis_deploy.config import Settings
from jarvis_deploy.deployments.schemas import DeployRequest
from jarvis_deploy.errors import InvalidRequest

BASE_REQUEST: dict[str, Any] = {
    "project_id": "0b7c6f0e-3f0c-4c59-9a59-2d8f8e7f4a10",
    "image_ref": "localhost:5000/testapp:v1",
    "port": 8080,
}


def build_request(**changes: Any) -> DeployRequest:
    return DeployRequest.model_validate({**BASE_REQUEST, **changes})


def bind(source: str) -> dict[str, Any]:
    return {"volumes": [{"source": "data", "target": "/data"}, {"source": source, "target": "/mnt/host"}]}


def build_settings(**changes: Any) -> Settings:
    # Keyword arguments take precedence over the environment and any .env file.
    defaults: dict[str, Any] = {
        "allowed_bind_roots": [],
        "allow_docker_socket": False,
        "allow_privileged_ports": False,
        "allowed_registries": [],
        "docker_url": "unix:///var/run/docker.sock",
    }
    return Settings(**{**defaults, **changes})


ROOTS = {"allowed_bind_roots": ["/srv/app", "/data/shared/"]}
# `bind()` puts the bind mount second, after a named volume.
SECOND_SOURCE = ("body", "volumes", 1, "source")


@pytest.mark.parametrize(
    ("changes", "settings_changes"),
    [
        ({}, {}),
        ({"volumes": [{"source": "data", "target": "/data"}]}, {}),
        (bind("/srv/app"), ROOTS),
        (bind("/srv/app/"), ROOTS),
        (bind("/srv/app/x"), ROOTS),
        (bind("/srv/app/x/../y"), ROOTS),
        (bind("/srv/app/./x"), ROOTS),
        (bind("//srv/app/x"), ROOTS),
        (bind("/srv//app///x"), ROOTS),
        (bind("/data/shared/cache"), ROOTS),
        (bind("/anything"), {"allowed_bind_roots": ["/"]}),
        (bind("/srv/app/run/docker.sock"), {**ROOTS, "allow_docker_socket": True}),
        (bind("/var/run/docker.sock"), {"allowed_bind_roots": ["/var/run"], "allow_docker_socket": True}),
        ({"port": 80, "host_port": 8080}, {}),
        ({"port": 8080, "host_port": 1024}, {}),
        ({"port": 80, "domain": "app.example.com"}, {}),
        ({"port": 80}, {"allow_privileged_ports": True}),
        ({"host_port": 443}, {"allow_privileged_ports": True}),
        ({"image_ref": "localhost:5000/testapp:v1"}, {"allowed_registries": ["localhost:5000"]}),
        ({"image_ref": "LocalHost:5000/testapp:v1"}, {"allowed_registries": ["localhost:5000"]}),
        ({"image_ref": "ghcr.io/acme/app:v1"}, {"allowed_registries": ["GHCR.io"]}),
        ({"image_ref": "nginx:1.25"}, {"allowed_registries": ["docker.io"]}),
        ({"image_ref": "library/nginx"}, {"allowed_registries": ["docker.io"]}),
        ({"image_ref": "docker.io/library/nginx"}, {"allowed_registries": ["docker.io"]}),
        ({"image_ref": "index.docker.io/library/nginx"}, {"allowed_registries": ["docker.io"]}),
        ({"image_ref": "nginx"}, {"allowed_registries": ["index.docker.io"]}),
        ({"image_ref": "registry.example.com/app"}, {}),
    ],
)
def test_policy_allows(changes: dict[str, Any], settings_changes: dict[str, Any]) -> None:
    policy.check_request(build_request(**changes), build_settings(**settings_changes))


@pytest.mark.parametrize(
    ("changes", "settings_changes", "expected_field", "message"),
    [
        # Bind mounts outside the allowed roots, including `..` and prefix tricks.
        (bind("/etc"), {}, SECOND_SOURCE, "JARVIS_ALLOWED_BIND_ROOTS is empty"),
        (bind("/srv/app"), {}, SECOND_SOURCE, "JARVIS_ALLOWED_BIND_ROOTS is empty"),
        (bind("/etc"), ROOTS, SECOND_SOURCE, "outside the allowed bind roots"),
        (bind("/srv/app/../../etc"), ROOTS, SECOND_SOURCE, "(normalized '/etc')"),
        (bind("/srv/app/.."), ROOTS, SECOND_SOURCE, "(normalized '/srv')"),
        (bind("/srv/app/x/../../other"), ROOTS, SECOND_SOURCE, "(normalized '/srv/other')"),
        (bind("/srv/application"), ROOTS, SECOND_SOURCE, "outside the allowed bind roots"),
        (bind("/srv/app-data"), ROOTS, SECOND_SOURCE, "outside the allowed bind roots"),
        (bind("/srv"), ROOTS, SECOND_SOURCE, "outside the allowed bind roots"),
        (bind("/"), ROOTS, SECOND_SOURCE, "Docker socket"),
        (bind("/data/sharedx"), ROOTS, SECOND_SOURCE, "outside the allowed bind roots"),
        (bind("/srv/./app/../../root/.ssh"), ROOTS, SECOND_SOURCE, "'/root/.ssh'"),
        (bind("/etc"), ROOTS, SECOND_SOURCE, "add a parent directory to JARVIS_ALLOWED_BIND_ROOTS"),
        # The Docker socket, and the directories above it, even inside an allowed root.
        (bind("/var/run/docker.sock"), {"allowed_bind_roots": ["/"]}, SECOND_SOURCE, "Docker socket"),
        (bind("/run/docker.sock"), {"allowed_bind_roots": ["/"]}, SECOND_SOURCE, "Docker socket"),
        (bind("/var/run"), {"allowed_bind_roots": ["/"]}, SECOND_SOURCE, "Docker socket"),
        (bind("/var/run/"), {"allowed_bind_roots": ["/"]}, SECOND_SOURCE, "Docker socket"),
        (bind("/run"), {"allowed_bind_roots": ["/"]}, SECOND_SOURCE, "Docker socket"),
        (bind("/var"), {"allowed_bind_roots": ["/"]}, SECOND_SOURCE, "Docker socket"),
        (bind("/"), {"allowed_bind_roots": ["/"]}, SECOND_SOURCE, "Docker socket"),
        (bind("/srv/app/docker.sock"), ROOTS, SECOND_SOURCE, "Docker socket"),
        (bind("/srv/app/my-docker.sock"), ROOTS, SECOND_SOURCE, "JARVIS_ALLOW_DOCKER_SOCKET=true"),
        (bind("/srv/app/../../var/run/docker.sock"), ROOTS, SECOND_SOURCE, "Docker socket"),
        (bind("/srv/app/../../run"), {"allowed_bind_roots": ["/"]}, SECOND_SOURCE, "Docker socket"),
        (
            bind("/opt/engine"),
            {"allowed_bind_roots": ["/opt"], "docker_url": "unix:///opt/engine/engine.socket"},
            SECOND_SOURCE,
            "Docker socket",
        ),
        # Privileged host ports.
        ({"port": 80}, {}, ("body", "port"), "host port 80 is below 1024"),
        ({"port": 8080, "host_port": 80}, {}, ("body", "host_port"), "host port 80 is below 1024"),
        ({"port": 8080, "host_port": 1023}, {}, ("body", "host_port"), "JARVIS_ALLOW_PRIVILEGED_PORTS=true"),
        ({"port": 22, "host_port": 1}, {}, ("body", "host_port"), "host port 1 is below 1024"),
        # Registries outside the allowed list.
        ({"image_ref": "nginx:1.25"}, {"allowed_registries": ["localhost:5000"]}, ("body", "image_ref"), "'docker.io'"),
        (
            {"image_ref": "evil.example.com/app:v1"},
            {"allowed_registries": ["localhost:5000"]},
            ("body", "image_ref"),
            "registry 'evil.example.com'",
        ),
        (
            {"image_ref": "localhost:5001/app:v1"},
            {"allowed_registries": ["localhost:5000"]},
            ("body", "image_ref"),
            "registry 'localhost:5001'",
        ),
        (
            {"image_ref": "localhost/app:v1"},
            {"allowed_registries": ["localhost:5000"]},
            ("body", "image_ref"),
            "registry 'localhost'",
        ),
        (
            {"image_ref": "localhost.evil.com:5000/app"},
            {"allowed_registries": ["localhost:5000"]},
            ("body", "image_ref"),
            "JARVIS_ALLOWED_REGISTRIES",
        ),
        (
            {"image_ref": "ghcr.io/docker.io/app"},
            {"allowed_registries": ["docker.io"]},
            ("body", "image_ref"),
            "registry 'ghcr.io'",
        ),
    ],
)
def test_policy_rejects(
    changes: dict[str, Any], settings_changes: dict[str, Any], expected_field: tuple[Any, ...], message: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        policy.check_request(build_request(**changes), build_settings(**settings_changes))

    assert caught.value.status_code == 422
    assert caught.value.field == expected_field
    assert message in caught.value.detail


def test_policy_message_shows_value_and_roots() -> None:
    with pytest.raises(InvalidRequest) as caught:
        policy.check_request(build_request(**bind("/srv/app/../../etc")), build_settings(**ROOTS))

    detail = caught.value.detail
    assert "'/srv/app/../../etc'" in detail
    assert "'/srv/app', '/data/shared'" in detail
    assert "named volume" in detail


def test_policy_checks_every_bind_mount() -> None:
    volumes = [{"source": "/srv/app/a", "target": "/a"}, {"source": "/etc", "target": "/b"}]

    with pytest.raises(InvalidRequest) as caught:
        policy.check_request(build_request(volumes=volumes), build_settings(**ROOTS))

    assert caught.value.field == SECOND_SOURCE


@pytest.mark.parametrize(
    ("path", "root", "expected"),
    [
        ("/srv/app", "/srv/app", True),
        ("/srv/app/x", "/srv/app", True),
        ("/srv/application", "/srv/app", False),
        ("/srv", "/srv/app", False),
        ("/anything", "/", True),
        ("/", "/", True),
    ],
)
def test_is_within(path: str, root: str, expected: bool) -> None:
    assert policy.is_within(path, root) is expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/srv/app/", "/srv/app"),
        ("//srv/app", "/srv/app"),
        ("///srv//app", "/srv/app"),
        ("/srv/app/../../etc", "/etc"),
        ("/../..", "/"),
        ("/srv/./app/.", "/srv/app"),
    ],
)
def test_normalize_host_path(path: str, expected: str) -> None:
    assert policy.normalize_host_path(path) == expected


@pytest.mark.parametrize("root", ["srv/app", "./srv", ""])
def test_settings_reject_relative_bind_root(root: str) -> None:
    with pytest.raises(ValidationError) as caught:
        build_settings(allowed_bind_roots=[root])

    assert caught.value.errors()[0]["loc"] == ("allowed_bind_roots",)


def test_settings_read_lists_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JARVIS_ALLOWED_BIND_ROOTS", '["/srv/app/", "//data"]')
    monkeypatch.setenv("JARVIS_ALLOWED_REGISTRIES", '["Registry.Example.com:5000"]')

    settings = Settings()

    assert settings.allowed_bind_roots == ["/srv/app", "/data"]
    assert settings.allowed_registries == ["registry.example.com:5000"]


def test_settings_defaults_are_strict(monkeypatch: pytest.MonkeyPatch) -> None:
    names = (
        "ALLOWED_BIND_ROOTS",
        "ALLOW_DOCKER_SOCKET",
        "ALLOW_PRIVILEGED_PORTS",
        "ALLOWED_REGISTRIES",
        "MAX_BODY_BYTES",
    )
    for name in names:
        monkeypatch.delenv(f"JARVIS_{name}", raising=False)

    settings = Settings(_env_file=None)

    assert settings.allowed_bind_roots == []
    assert settings.allow_docker_socket is False
    assert settings.allow_privileged_ports is False
    assert settings.allowed_registries == []
    assert settings.max_body_bytes == 1024 * 1024


# Fields a container would need to escape to the host. DeployRequest has none of them and forbids
# unknown fields, so each is rejected by schema validation, naming the field.
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("privileged", True),
        ("network_mode", "host"),
        ("pid", "host"),
        ("ipc", "host"),
        ("cap_add", ["SYS_ADMIN"]),
        ("devices", ["/dev/sda:/dev/sda"]),
    ],
)
def test_host_access_field_rejected(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        DeployRequest.model_validate({**BASE_REQUEST, field: value})

    errors = caught.value.errors()
    assert len(errors) == 1
    assert errors[0]["loc"] == (field,)
    assert errors[0]["type"] == "extra_forbidden"


@pytest.mark.parametrize(
    ("field", "bound"),
    [
        ("domain", "at most 50"),
        ("environment", "at most 500 entries"),
        ("environment", "at most 65536 characters"),
        ("environment", "1 to 1024 characters"),
        ("volumes", "at most 50"),
        ("networks", "at most 20"),
        ("networks", "at most 128 characters"),
    ],
)
def test_request_bound_in_description(field: str, bound: str) -> None:
    description = DeployRequest.model_json_schema()["properties"][field]["description"]

    assert bound in description


@pytest.mark.parametrize(
    ("changes", "expected_loc"),
    [
        ({"domain": [f"a{index}.example.com" for index in range(51)]}, ("domain",)),
        ({"environment": {f"K{index}": "v" for index in range(501)}}, ("environment",)),
        ({"environment": {"BIG": "x" * 65537}}, ("environment", "BIG")),
        ({"environment": {"K" * 1025: "v"}}, ("environment", "K" * 1025, "[key]")),
        ({"volumes": [{"source": f"v{index}", "target": f"/v{index}"} for index in range(51)]}, ("volumes",)),
        ({"networks": [f"n{index}" for index in range(21)]}, ("networks",)),
        ({"networks": ["n" * 129]}, ("networks",)),
    ],
)
def test_request_size_bound_enforced(changes: dict[str, Any], expected_loc: tuple[Any, ...]) -> None:
    with pytest.raises(ValidationError) as caught:
        DeployRequest.model_validate({**BASE_REQUEST, **changes})

    assert caught.value.errors()[0]["loc"] == expected_loc

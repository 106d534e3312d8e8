"""Translation of stored Compose documents into Docker Engine create bodies."""

from typing import Any

import pytest
import yaml

from jarvis_deploy import naming
from jarvis_deploy.compose.render import RenderOptions, load_spec, render
from jarvis_deploy.deployments.schemas import DeployRequest
from jarvis_deploy.engine.errors import TranslationError
from jarvis_deploy.engine.translate import (
    NetworkAttachment,
    PortMapping,
    compose_labels,
    container_config,
    parse_port,
)

PROJECT = "shop"


def stored_document(**service_overrides: Any) -> dict[str, Any]:
    """A document as the worker loads it: `$` in string values is still escaped as `$$`."""
    service: dict[str, Any] = {
        "image": "localhost:5000/testapp:v1",
        "restart": "unless-stopped",
        "environment": {"PLAIN": "value", "DOLLAR": "a$$b", "DOUBLE": "$$$$HOME", "BRACES": "$${HOME}"},
        "labels": {"caddy": "a.example.com", "caddy.reverse_proxy": "{{upstreams 8080}}"},
        "networks": {"default": {}, "caddy": {}, "backend": {}},
        "volumes": [
            {"type": "volume", "source": "data", "target": "/data", "read_only": False},
            {"type": "bind", "source": "/srv/a b:c", "target": "/cfg"},
        ],
        "logging": {"driver": "json-file", "options": {"max-size": "10m", "max-file": "3"}},
        "x-jarvis": {"port": 8080, "replicas": 1, "strategy": "recreate", "healthcheck": None},
    }
    service.update(service_overrides)
    return {
        "services": {PROJECT: service},
        "networks": {
            "default": {"name": f"{PROJECT}_default"},
            "caddy": {"name": "caddy", "external": True},
            "backend": {"name": "backend"},
        },
        "volumes": {"data": {"name": f"{PROJECT}_data"}},
    }


def test_image_and_restart_policy() -> None:
    body = container_config(stored_document(), PROJECT, {}).body

    assert body["Image"] == "localhost:5000/testapp:v1"
    assert body["HostConfig"]["RestartPolicy"] == {"Name": "unless-stopped"}


def test_environment_unescaped_exactly_once() -> None:
    body = container_config(stored_document(), PROJECT, {}).body

    assert body["Env"] == ["PLAIN=value", "DOLLAR=a$b", "DOUBLE=$$HOME", "BRACES=${HOME}"]


def test_environment_list_form() -> None:
    body = container_config(stored_document(environment=["A=1", "B=x$$y", "C="]), PROJECT, {}).body

    assert body["Env"] == ["A=1", "B=x$y", "C="]


@pytest.mark.parametrize("value", [True, 493, 1.5, None])
def test_environment_rejects_non_string_value(value: object) -> None:
    with pytest.raises(TranslationError, match="KEY"):
        container_config(stored_document(environment={"KEY": value}), PROJECT, {})


def test_environment_rejects_entry_without_value() -> None:
    with pytest.raises(TranslationError, match="host environment"):
        container_config(stored_document(environment=["FROM_HOST"]), PROJECT, {})


def test_labels_merged_with_extra_labels() -> None:
    extra = {naming.LABEL_PROJECT: PROJECT, "caddy": "override.example.com"}

    labels = container_config(stored_document(), PROJECT, extra).body["Labels"]

    assert labels["caddy.reverse_proxy"] == "{{upstreams 8080}}"
    assert labels[naming.LABEL_PROJECT] == PROJECT
    assert labels["caddy"] == "override.example.com"


def test_labels_unescaped() -> None:
    labels = container_config(stored_document(labels={"note": "costs $$5"}), PROJECT, {}).body["Labels"]

    assert labels == {"note": "costs $5"}


def test_exposed_port_from_extension() -> None:
    body = container_config(stored_document(), PROJECT, {}).body

    assert body["ExposedPorts"] == {"8080/tcp": {}}
    assert body["HostConfig"]["PortBindings"] == {}


def test_port_bindings_from_short_syntax() -> None:
    document = stored_document(ports=["18080:8080", "127.0.0.1:18081:8081", "[::1]:5353:53/udp"])

    host_config = container_config(document, PROJECT, {}).body["HostConfig"]

    assert host_config["PortBindings"] == {
        "8080/tcp": [{"HostIp": "", "HostPort": "18080"}],
        "8081/tcp": [{"HostIp": "127.0.0.1", "HostPort": "18081"}],
        "53/udp": [{"HostIp": "::1", "HostPort": "5353"}],
    }


def test_exposed_ports_include_published_ports() -> None:
    document = stored_document(ports=["127.0.0.1:18081:8081", "9000/udp"], expose=["7000-7001"])

    exposed = container_config(document, PROJECT, {}).body["ExposedPorts"]

    assert set(exposed) == {"8080/tcp", "8081/tcp", "9000/udp", "7000/tcp", "7001/tcp"}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("8080", [PortMapping(8080, "tcp")]),
        (8080, [PortMapping(8080, "tcp")]),
        ("18080:8080", [PortMapping(8080, "tcp", "", "18080")]),
        ("0.0.0.0:18080:8080/tcp", [PortMapping(8080, "tcp", "0.0.0.0", "18080")]),
        ("127.0.0.1::8080", [PortMapping(8080, "tcp", "127.0.0.1", "")]),
        ("::1:18080:8080", [PortMapping(8080, "tcp", "::1", "18080")]),
        ("[::]:18080:8080/sctp", [PortMapping(8080, "sctp", "::", "18080")]),
        ("8000-8001:80-81", [PortMapping(80, "tcp", "", "8000"), PortMapping(81, "tcp", "", "8001")]),
        ("9000-9010:80", [PortMapping(80, "tcp", "", "9000-9010")]),
        ("80-81", [PortMapping(80, "tcp"), PortMapping(81, "tcp")]),
        (
            {"target": 8080, "published": "18080", "host_ip": "127.0.0.1", "protocol": "udp", "mode": "host"},
            [PortMapping(8080, "udp", "127.0.0.1", "18080")],
        ),
        ({"target": 8080}, [PortMapping(8080, "tcp")]),
    ],
)
def test_parse_port(spec: str | int | dict[str, Any], expected: list[PortMapping]) -> None:
    assert parse_port(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "abc",
        "0",
        "70000",
        "1:2:3:4:x",
        "8080/http",
        "host:8080:80",
        "[::1:8080:80",
        "8000-8002:80-81",
        "81-80",
        True,
    ],
)
def test_parse_port_rejects_invalid(spec: str | bool) -> None:
    with pytest.raises(TranslationError, match="ports"):
        parse_port(spec)


def test_log_config() -> None:
    host_config = container_config(stored_document(), PROJECT, {}).body["HostConfig"]

    assert host_config["LogConfig"] == {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "3"}}


def test_mounts_use_real_volume_names() -> None:
    plan = container_config(stored_document(), PROJECT, {})

    assert plan.body["HostConfig"]["Mounts"] == [
        {"Type": "volume", "Source": f"{PROJECT}_data", "Target": "/data", "ReadOnly": False},
        {"Type": "bind", "Source": "/srv/a b:c", "Target": "/cfg", "ReadOnly": False},
    ]
    assert plan.volumes == [f"{PROJECT}_data"]


def test_mount_short_syntax_and_read_only() -> None:
    plan = container_config(stored_document(volumes=["data:/data:ro", "/etc/app:/etc/app"]), PROJECT, {})

    assert plan.body["HostConfig"]["Mounts"] == [
        {"Type": "volume", "Source": f"{PROJECT}_data", "Target": "/data", "ReadOnly": True},
        {"Type": "bind", "Source": "/etc/app", "Target": "/etc/app", "ReadOnly": False},
    ]


def test_mount_of_undeclared_volume_rejected() -> None:
    document = stored_document(volumes=[{"type": "volume", "source": "other", "target": "/other"}])

    with pytest.raises(TranslationError, match="'other'"):
        container_config(document, PROJECT, {})


def test_bind_mount_source_unescaped() -> None:
    document = stored_document(volumes=[{"type": "bind", "source": "/srv/$$dir", "target": "/cfg"}])

    mounts = container_config(document, PROJECT, {}).body["HostConfig"]["Mounts"]

    assert mounts[0]["Source"] == "/srv/$dir"


def test_first_network_is_network_mode() -> None:
    plan = container_config(stored_document(), PROJECT, {})

    assert plan.primary_network == f"{PROJECT}_default"
    assert plan.body["NetworkingConfig"] == {"EndpointsConfig": {f"{PROJECT}_default": {"Aliases": [PROJECT]}}}


def test_further_networks_connected_with_alias() -> None:
    plan = container_config(stored_document(), PROJECT, {})

    assert plan.networks == [
        NetworkAttachment("caddy", [PROJECT]),
        NetworkAttachment("backend", [PROJECT]),
    ]


def test_network_order_follows_document() -> None:
    plan = container_config(stored_document(networks={"backend": {}, "default": {}}), PROJECT, {})

    assert plan.primary_network == "backend"
    assert plan.networks == [NetworkAttachment(f"{PROJECT}_default", [PROJECT])]


def test_network_without_name_gets_project_prefix() -> None:
    document = stored_document(networks=["default", "internal"])
    document["name"] = PROJECT
    document["networks"]["internal"] = {}

    plan = container_config(document, PROJECT, {})

    assert plan.networks == [NetworkAttachment(f"{PROJECT}_internal", [PROJECT])]


def test_undeclared_network_rejected() -> None:
    with pytest.raises(TranslationError, match="'elsewhere'"):
        container_config(stored_document(networks={"elsewhere": {}}), PROJECT, {})


def test_unsupported_service_key_rejected() -> None:
    with pytest.raises(TranslationError, match="command"):
        container_config(stored_document(command=["run"]), PROJECT, {})


def test_missing_service_rejected() -> None:
    with pytest.raises(TranslationError, match="'other'"):
        container_config(stored_document(), "other", {})


@pytest.mark.parametrize(
    ("restart", "expected"),
    [
        (None, {"Name": "no"}),
        ("no", {"Name": "no"}),
        ("always", {"Name": "always"}),
        ("on-failure", {"Name": "on-failure"}),
        ("on-failure:5", {"Name": "on-failure", "MaximumRetryCount": 5}),
    ],
)
def test_restart_policy(restart: str | None, expected: dict[str, Any]) -> None:
    document = stored_document()
    if restart is None:
        del document["services"][PROJECT]["restart"]
    else:
        document["services"][PROJECT]["restart"] = restart

    assert container_config(document, PROJECT, {}).body["HostConfig"]["RestartPolicy"] == expected


@pytest.mark.parametrize("restart", ["sometimes", "always:3", "on-failure:x"])
def test_restart_policy_rejects_invalid(restart: str) -> None:
    with pytest.raises(TranslationError, match="restart"):
        container_config(stored_document(restart=restart), PROJECT, {})


def test_document_not_modified() -> None:
    document = stored_document()
    before = yaml.safe_dump(document)

    container_config(document, PROJECT, {"extra": "label"})

    assert yaml.safe_dump(document) == before


def test_compose_labels() -> None:
    assert compose_labels(PROJECT, PROJECT, 2, "abc123") == {
        "com.docker.compose.project": PROJECT,
        "com.docker.compose.service": PROJECT,
        "com.docker.compose.container-number": "2",
        "com.docker.compose.config-hash": "abc123",
        "com.docker.compose.oneoff": "False",
    }


def test_rendered_document_round_trip() -> None:
    """Values that YAML 1.1 would retype, and `$` in every position, survive render, YAML and translation."""
    environment = {
        "YES": "yes",
        "OCTAL": "0755",
        "DOLLARS": "$a $$b ${c} $",
        "LINES": "one\ntwo\n",
        "EMPTY": "",
        "NULL": "null",
    }
    request = DeployRequest.model_validate(
        {
            "project_id": "0b7c6f0e-3f0c-4c59-9a59-2d8f8e7f4a10",
            "image_ref": "localhost:5000/testapp:v1",
            "port": 8080,
            "host_port": 18080,
            "environment": environment,
            "volumes": [{"source": "data", "target": "/data"}, {"source": "/srv/a $b", "target": "/cfg"}],
        }
    )
    rendered = render(request, PROJECT, RenderOptions(proxy_network="caddy", publish_host_ip="127.0.0.1"))

    plan = container_config(load_spec(rendered.yaml), PROJECT, {})

    assert sorted(plan.body["Env"]) == sorted(f"{key}={value}" for key, value in environment.items())
    assert plan.body["HostConfig"]["PortBindings"] == {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": "18080"}]}
    assert {mount["Source"] for mount in plan.body["HostConfig"]["Mounts"]} == {f"{PROJECT}_data", "/srv/a $b"}
    assert plan.primary_network == f"{PROJECT}_default"

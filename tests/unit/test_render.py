import hashlib
import subprocess
import sys
from typing import Any

import pytest
import yaml

from jarvis_deploy.compose.render import (
    RenderOptions,
    dump_spec,
    escape_document,
    escape_interpolation,
    load_spec,
    render,
    unescape_document,
    unescape_interpolation,
    validate_document,
)
from jarvis_deploy.config import Settings
from jarvis_deploy.deployments.schemas import DeployRequest

PROJECT = "shop"
OPTIONS = RenderOptions(proxy_network="caddy")
PEM_KEY = (
    "-----BEGIN PRIVATE KEY-----\n"
    "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj\n"
    "MzEfYyjiWA4R4/M2bS1GB4t7NXp98C3SC6dVMvDuictGeurT8jNbvJZHtCSuYEvu\n"
    "+/=$$x\n"
    "-----END PRIVATE KEY-----\n"
)

# Each case: environment key, value in the request, and the exact double-quoted YAML scalar of the value.
TRICKY_ENVIRONMENT = [
    ("DB_PASSWORD", "abc$def", '"abc$$def"'),
    ("CONNECTION_STRING", "Server=db;Password=123#abc;", '"Server=db;Password=123#abc;"'),
    ("BOOL_YES", "yes", '"yes"'),
    ("BOOL_OFF", "off", '"off"'),
    ("BOOL_TRUE", "true", '"true"'),
    ("OCTAL_LIKE", "0123", '"0123"'),
    ("VERSION", "24.10", '"24.10"'),
    ("FILE_MODE", "0755", '"0755"'),
    ("TILDE", "~", '"~"'),
    ("NULL_WORD", "null", '"null"'),
    ("EXPONENT", "1e3", '"1e3"'),
    ("PRIVATE_KEY", PEM_KEY, None),
    ("spring.profiles.active", "production", '"production"'),
    ("services__storage-service__http__0", "http://storage:8080", '"http://storage:8080"'),
    ("ALREADY_ESCAPED", "$$already", '"$$$$already"'),
    ("BRACED", "${HOME}", '"$${HOME}"'),
    ("EMPTY", "", '""'),
    ("QUOTES", "say \"hi\" and 'bye'", "\"say \\\"hi\\\" and 'bye'\""),
    ("BACKSLASH", "C:\\path\\", '"C:\\\\path\\\\"'),
    ("TAB", "a\tb", '"a\\tb"'),
    ("SPACES", "  padded  ", '"  padded  "'),
    ("COLON_SPACE", "key: value", '"key: value"'),
    ("DASH_SPACE", "- item", '"- item"'),
    ("COMMENT", "# not a comment", '"# not a comment"'),
    ("UNICODE", "bücher ✓", '"bücher ✓"'),
]


def build_request(**changes: Any) -> DeployRequest:
    data: dict[str, Any] = {
        "project_id": "0b7c6f0e-3f0c-4c59-9a59-2d8f8e7f4a10",
        "image_ref": "localhost:5000/testapp:v1",
        "port": 8080,
    }
    data.update(changes)
    return DeployRequest.model_validate(data)


def tricky_request(**changes: Any) -> DeployRequest:
    environment = {key: value for key, value, _ in TRICKY_ENVIRONMENT}
    return build_request(environment=environment, **changes)


def service_of(document: dict[str, Any]) -> dict[str, Any]:
    return document["services"][PROJECT]


@pytest.mark.parametrize(("key", "value", "scalar"), TRICKY_ENVIRONMENT, ids=[case[0] for case in TRICKY_ENVIRONMENT])
def test_render_environment_value_round_trip(key: str, value: str, scalar: str | None) -> None:
    spec = render(tricky_request(), PROJECT, OPTIONS)

    loaded = load_spec(spec.yaml)
    assert service_of(loaded)["environment"][key] == escape_interpolation(value)
    assert service_of(unescape_document(loaded))["environment"][key] == value
    if scalar is not None:
        assert f'      "{key}": {scalar}\n' in spec.yaml


def test_render_private_key_stays_on_one_line() -> None:
    spec = render(tricky_request(), PROJECT, OPTIONS)

    lines = [line for line in spec.yaml.splitlines() if line.startswith('      "PRIVATE_KEY": ')]
    assert len(lines) == 1
    assert lines[0].endswith('-----END PRIVATE KEY-----\\n"')
    assert "\\n+/=$$$$x\\n" in lines[0]


def test_render_strings_load_as_strings() -> None:
    spec = render(tricky_request(), PROJECT, OPTIONS)

    environment = service_of(yaml.safe_load(spec.yaml))["environment"]
    non_strings = {key: value for key, value in environment.items() if not isinstance(value, str)}
    assert non_strings == {}


def test_render_quotes_every_string_scalar() -> None:
    spec = render(tricky_request(volumes=[{"source": "data", "target": "/data"}]), PROJECT, OPTIONS)

    events = yaml.parse(spec.yaml, Loader=yaml.SafeLoader)
    plain = [event.value for event in events if isinstance(event, yaml.ScalarEvent) and event.style != '"']
    # Only numbers (parallelism, replicas, port) and the absent health check stay plain.
    assert sorted(plain) == ["1", "1", "8080", "null"]


def test_render_escapes_values_not_keys() -> None:
    spec = render(build_request(environment={"A$B": "c$d"}), PROJECT, OPTIONS)

    assert '      "A$B": "c$$d"\n' in spec.yaml
    assert service_of(spec.document)["environment"] == {"A$B": "c$$d"}


def test_render_is_deterministic() -> None:
    first = render(tricky_request(), PROJECT, OPTIONS)
    second = render(tricky_request(), PROJECT, OPTIONS)

    assert first.yaml == second.yaml
    assert first.checksum == second.checksum
    assert first.document == second.document
    assert first.checksum == hashlib.sha256(first.yaml.encode("utf-8")).hexdigest()


def test_render_ignores_environment_order() -> None:
    forward = build_request(environment={"A": "1", "B": "2"})
    backward = build_request(environment={"B": "2", "A": "1"})

    assert render(forward, PROJECT, OPTIONS).yaml == render(backward, PROJECT, OPTIONS).yaml


@pytest.mark.parametrize(
    "changes",
    [
        {"environment": {"DB_PASSWORD": "abc$deg"}},
        {"image_ref": "localhost:5000/testapp:v2"},
        {"port": 8081},
        {"host_port": 18080},
        {"domain": "app.example.com"},
        {"volumes": [{"source": "data", "target": "/data"}]},
        {"networks": ["backend"]},
        {"strategy": "rolling", "domain": "app.example.com"},
        {"healthcheck": {"path": "/healthz"}},
    ],
)
def test_render_checksum_changes(changes: dict[str, Any]) -> None:
    baseline = render(build_request(environment={"DB_PASSWORD": "abc$def"}), PROJECT, OPTIONS)
    changed = render(build_request(**{"environment": {"DB_PASSWORD": "abc$def"}, **changes}), PROJECT, OPTIONS)

    assert changed.checksum != baseline.checksum


def test_render_document_matches_yaml() -> None:
    spec = render(tricky_request(volumes=[{"source": "data", "target": "/data"}]), PROJECT, OPTIONS)

    assert load_spec(spec.yaml) == spec.document
    assert dump_spec(spec.document) == spec.yaml


def test_render_without_domain() -> None:
    spec = render(build_request(host_port=18080), PROJECT, OPTIONS)
    service = service_of(spec.document)

    assert "name" not in spec.document
    assert list(spec.document["services"]) == [PROJECT]
    assert service["image"] == "localhost:5000/testapp:v1"
    assert service["restart"] == "unless-stopped"
    assert service["ports"] == ["18080:8080"]
    assert "labels" not in service
    assert "environment" not in service
    assert "volumes" not in service
    assert service["networks"] == {"default": {}}
    assert spec.document["networks"] == {"default": {"name": "shop_default"}}
    assert "volumes" not in spec.document
    assert service["logging"] == {"driver": "json-file", "options": {"max-size": "10m", "max-file": "3"}}


@pytest.mark.parametrize(
    ("host_port", "publish_host_ip", "expected"),
    [
        (None, "", "8080:8080"),
        (18080, "", "18080:8080"),
        (18080, "127.0.0.1", "127.0.0.1:18080:8080"),
        (None, "::1", "[::1]:8080:8080"),
        (18080, "[::1]", "[::1]:18080:8080"),
    ],
)
def test_render_port_mapping(host_port: int | None, publish_host_ip: str, expected: str) -> None:
    options = RenderOptions(proxy_network="caddy", publish_host_ip=publish_host_ip)

    spec = render(build_request(host_port=host_port), PROJECT, options)

    assert service_of(spec.document)["ports"] == [expected]


def test_render_with_domains() -> None:
    request = build_request(domain=["b.example.com", "a.example.com"], replicas=2, host_port=18080)

    spec = render(request, PROJECT, OPTIONS)
    service = service_of(spec.document)

    assert service["labels"] == {"caddy": "a.example.com, b.example.com", "caddy.reverse_proxy": "{{upstreams 8080}}"}
    assert "ports" not in service
    assert service["networks"] == {"caddy": {}, "default": {}}
    assert spec.document["networks"]["caddy"] == {"name": "caddy", "external": True}
    assert service["x-jarvis"]["replicas"] == 2


def test_render_extra_networks() -> None:
    spec = render(build_request(networks=["backend", "caddy", "shop_default"]), PROJECT, OPTIONS)
    service = service_of(spec.document)

    assert service["networks"] == {"backend": {}, "caddy": {}, "default": {}}
    assert spec.document["networks"] == {
        "backend": {"name": "backend"},
        "caddy": {"name": "caddy", "external": True},
        "default": {"name": "shop_default"},
    }


def test_render_proxy_network_listed_once() -> None:
    request = build_request(domain="app.example.com", networks=["caddy", "backend"])

    spec = render(request, PROJECT, OPTIONS)

    assert spec.yaml.count('"name": "caddy"') == 1
    assert spec.document["networks"]["caddy"] == {"name": "caddy", "external": True}


def test_render_volumes() -> None:
    volumes = [
        {"source": "data", "target": "/var/lib/data"},
        {"source": "/srv/my files:2024", "target": "/import", "read_only": True},
        {"source": "cache.v2", "target": "/cache"},
        {"source": "data", "target": "/backup/data", "read_only": True},
    ]

    spec = render(build_request(volumes=volumes), PROJECT, OPTIONS)

    assert service_of(spec.document)["volumes"] == [
        {"type": "volume", "source": "data", "target": "/backup/data", "read_only": True},
        {"type": "volume", "source": "cache.v2", "target": "/cache"},
        {"type": "bind", "source": "/srv/my files:2024", "target": "/import", "read_only": True},
        {"type": "volume", "source": "data", "target": "/var/lib/data"},
    ]
    assert spec.document["volumes"] == {"cache.v2": {"name": "shop_cache.v2"}, "data": {"name": "shop_data"}}


def test_render_extension_field() -> None:
    healthcheck = {"type": "http", "path": "/health$z", "interval": 0.5, "retries": 5}
    request = build_request(strategy="blue-green", domain="app.example.com", healthcheck=healthcheck)

    spec = render(request, PROJECT, OPTIONS)
    extension = service_of(unescape_document(load_spec(spec.yaml)))["x-jarvis"]

    assert extension["port"] == 8080
    assert extension["replicas"] == 1
    assert extension["strategy"] == "blue-green"
    assert extension["domains"] == ["app.example.com"]
    assert extension["healthcheck"] == request.healthcheck.model_dump(mode="json")
    assert extension["healthcheck"]["path"] == "/health$z"


def test_render_extension_without_healthcheck() -> None:
    spec = render(build_request(), PROJECT, OPTIONS)

    assert service_of(spec.document)["x-jarvis"]["healthcheck"] is None
    assert '"healthcheck": null\n' in spec.yaml


def test_render_log_options() -> None:
    options = RenderOptions(proxy_network="caddy", log_max_size="50m", log_max_file=7)

    spec = render(build_request(), PROJECT, options)

    assert service_of(spec.document)["logging"]["options"] == {"max-size": "50m", "max-file": "7"}


@pytest.mark.parametrize("project", ["", "Shop", "-shop", "shop.app", "a" * 30, "shop app"])
def test_render_rejects_project_name(project: str) -> None:
    with pytest.raises(ValueError, match="project name"):
        render(build_request(), project, OPTIONS)


def test_render_options_from_settings() -> None:
    settings = Settings(proxy_network="edge", publish_host_ip="127.0.0.1", log_max_size="5m", log_max_file=2)

    options = RenderOptions.from_settings(settings)

    assert options == RenderOptions(proxy_network="edge", publish_host_ip="127.0.0.1", log_max_size="5m", log_max_file=2)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"host_port": 18080},
        {"domain": ["app.example.com", "*.example.org"], "replicas": 3},
    ],
    ids=["no-domain", "host-port", "domain"],
)
def test_render_matches_compose_schema(changes: dict[str, Any]) -> None:
    volumes = [
        {"source": "data", "target": "/data"},
        {"source": "/srv/my files:2024", "target": "/import", "read_only": True},
    ]
    request = tricky_request(volumes=volumes, networks=["backend", "caddy"], healthcheck={"path": "/"}, **changes)

    spec = render(request, PROJECT, OPTIONS)

    validate_document(spec.document)
    validate_document(load_spec(spec.yaml))


def test_validate_document_lists_errors() -> None:
    spec = render(build_request(), PROJECT, OPTIONS)
    document = load_spec(spec.yaml)
    document["services"][PROJECT]["bogus"] = 1
    document["services"][PROJECT]["restart"] = 5

    with pytest.raises(ValueError) as caught:
        validate_document(document)

    message = str(caught.value)
    assert "services.shop: 'bogus' does not match any of the regexes" in message
    assert "services.shop.restart: 5 is not of type 'string'" in message


@pytest.mark.parametrize(
    ("escaped", "expected"),
    [
        ("", ""),
        ("plain", "plain"),
        ("abc$$def", "abc$def"),
        ("$$$$already", "$$already"),
        ("$${HOME}", "${HOME}"),
        ("$$", "$"),
        ("a$b", "a$b"),
    ],
)
def test_unescape_interpolation(escaped: str, expected: str) -> None:
    assert unescape_interpolation(escaped) == expected


@pytest.mark.parametrize("value", ["", "$", "$$", "$$$", "a$b$$c$$$d", "${X:-y}", "no dollar"])
def test_escape_interpolation_round_trip(value: str) -> None:
    assert unescape_interpolation(escape_interpolation(value)) == value


def test_escape_document_keeps_keys_and_scalars() -> None:
    document = {"$key": ["$a", {"$b": "$c"}, 1, True, None, 0.5]}

    escaped = escape_document(document)

    assert escaped == {"$key": ["$$a", {"$b": "$$c"}, 1, True, None, 0.5]}
    assert unescape_document(escaped) == document
    assert document == {"$key": ["$a", {"$b": "$c"}, 1, True, None, 0.5]}


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "plain\n"])
def test_load_spec_rejects_non_mapping(text: str) -> None:
    with pytest.raises(ValueError, match="mapping at the top level"):
        load_spec(text)


def test_render_imports_no_io_modules() -> None:
    code = (
        "import sys, jarvis_deploy.compose.render; "
        "print(','.join(sorted(m for m in ('aiodocker', 'sqlalchemy', 'asyncpg', 'arq', 'redis', 'httpx') if m in sys.modules)))"
    )

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert result.stdout.strip() == ""

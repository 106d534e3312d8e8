"""Rendering of a deployment request into a Compose document and its YAML text.

Pure: no database, Docker or network access. The only file read is the bundled Compose
JSON schema, loaded on the first call of `validate_document`.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import SecretStr

from jarvis_deploy import naming
from jarvis_deploy.deployments.schemas import DeployRequest, Volume
from jarvis_deploy.secrets.cipher import SecretCipher

if TYPE_CHECKING:
    from jarvis_deploy.config import Settings

RESTART_POLICY = "unless-stopped"
LOG_DRIVER = "json-file"
EXTENSION_KEY = "x-jarvis"
DEFAULT_NETWORK_KEY = "default"
SCHEMA_RESOURCE = "compose-spec.json"
# Large enough that PyYAML never folds a long double-quoted scalar onto a second line.
YAML_WIDTH = 1 << 30


@dataclass(frozen=True)
class RenderOptions:
    """Service-wide settings that shape every rendered document."""

    proxy_network: str
    publish_host_ip: str = ""
    upstream_mode: str = "network"
    log_max_size: str = "10m"
    log_max_file: int = 3
    # JARVIS_SECRET_KEY: secret values appear in the document only as placeholders keyed by it.
    secret_key: SecretStr | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> RenderOptions:
        return cls(
            proxy_network=settings.proxy_network,
            publish_host_ip=settings.publish_host_ip,
            upstream_mode=settings.upstream_mode,
            log_max_size=settings.log_max_size,
            log_max_file=settings.log_max_file,
            secret_key=settings.secret_key,
        )


@dataclass(frozen=True)
class RenderedSpec:
    """Compose document with `$` already escaped, its YAML text, and the SHA-256 hex of that text's UTF-8 bytes.

    `load_spec(yaml)` returns a mapping equal to `document`.
    """

    document: dict[str, Any]
    yaml: str
    checksum: str


class _QuotedDumper(yaml.SafeDumper):
    """SafeDumper that double-quotes every string and never writes anchors or aliases.

    Double quotes keep YAML 1.1 readers such as docker-compose 1.29 from reading `yes`, `off`,
    `0755` or `1e3` as booleans or numbers, and turn line breaks into `\\n` escapes.
    """

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style='"')


_QuotedDumper.add_representer(str, _represent_str)


def render(request: DeployRequest, project: str, options: RenderOptions) -> RenderedSpec:
    """Render the request as a Compose document with one service named after the project.

    The project name is not written into the document because docker-compose 1.29 rejects a
    top-level `name` key, so callers pass it with `-p`. Each secret becomes an environment entry
    whose value is its placeholder, so the checksum changes with the value but the text contains none.
    Raises ValueError when the request has secrets and `options.secret_key` is None.
    """
    _validate_project(project)

    document: dict[str, Any] = {
        "services": {project: _render_service(request, project, options)},
        "networks": _render_networks(request, project, options),
    }
    volumes = _render_volumes(request, project)
    if volumes:
        document["volumes"] = volumes

    document = escape_document(document)
    text = dump_spec(document)
    checksum = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return RenderedSpec(document=document, yaml=text, checksum=checksum)


def _validate_project(project: str) -> None:
    if len(project) > naming.PROJECT_NAME_MAX_LENGTH or not naming.PROJECT_NAME.match(project):
        raise ValueError(
            f"project name {project!r} is invalid. Expected at most {naming.PROJECT_NAME_MAX_LENGTH}"
            " characters of lowercase letters, digits, '_' and '-', starting with a letter or digit"
        )


def _render_service(request: DeployRequest, project: str, options: RenderOptions) -> dict[str, Any]:
    service: dict[str, Any] = {
        "image": request.image_ref,
        "restart": RESTART_POLICY,
        "networks": {name: {} for name in _service_network_keys(request, project, options)},
        "logging": {
            "driver": LOG_DRIVER,
            "options": {"max-size": options.log_max_size, "max-file": str(options.log_max_file)},
        },
        EXTENSION_KEY: {
            "port": request.port,
            "replicas": request.replicas,
            "parallelism": request.parallelism,
            "strategy": request.strategy.value,
            "domains": request.domains,
            "healthcheck": request.healthcheck.model_dump(mode="json") if request.healthcheck else None,
        },
    }

    environment = {**request.environment, **_secret_placeholders(request, options)}
    if environment:
        service["environment"] = environment

    domains = request.domains
    if domains:
        service["labels"] = {
            "caddy": ", ".join(domains),
            "caddy.reverse_proxy": f"{{{{upstreams {request.port}}}}}",
        }
        if options.upstream_mode == "loopback":
            # Caddy runs on the host and dials a port that Docker picks on loopback.
            service["ports"] = [f"127.0.0.1::{request.port}"]
    else:
        service["ports"] = [_render_port(request, options)]

    if request.volumes:
        ordered = sorted(request.volumes, key=lambda volume: volume.target)
        service["volumes"] = [_render_mount(volume) for volume in ordered]

    return service


def _secret_placeholders(request: DeployRequest, options: RenderOptions) -> dict[str, str]:
    if not request.secrets:
        return {}
    if options.secret_key is None:
        raise ValueError("the request has secrets, but no secret key was given to render their placeholders")
    cipher = SecretCipher(options.secret_key)
    return {name: cipher.placeholder(name, value.get_secret_value()) for name, value in request.secrets.items()}


def _render_port(request: DeployRequest, options: RenderOptions) -> str:
    host_port = request.host_port if request.host_port is not None else request.port
    mapping = f"{host_port}:{request.port}"
    host_ip = options.publish_host_ip
    if not host_ip:
        return mapping
    if ":" in host_ip and not host_ip.startswith("["):
        host_ip = f"[{host_ip}]"
    return f"{host_ip}:{mapping}"


def _render_mount(volume: Volume) -> dict[str, Any]:
    mount: dict[str, Any] = {
        "type": "bind" if volume.is_bind else "volume",
        "source": volume.source,
        "target": volume.target,
    }
    if volume.read_only:
        mount["read_only"] = True
    return mount


def _extra_network_names(request: DeployRequest, project: str) -> list[str]:
    """Extra networks of the request, without the project's default network, which is always attached."""
    default_name = naming.default_network(project)
    return [name for name in request.networks if name != default_name]


def _service_network_keys(request: DeployRequest, project: str, options: RenderOptions) -> list[str]:
    keys = [DEFAULT_NETWORK_KEY]
    if request.domains:
        keys.append(options.proxy_network)
    keys.extend(_extra_network_names(request, project))
    return sorted(set(keys))


def _render_networks(request: DeployRequest, project: str, options: RenderOptions) -> dict[str, Any]:
    networks: dict[str, Any] = {DEFAULT_NETWORK_KEY: {"name": naming.default_network(project)}}
    for name in _extra_network_names(request, project):
        networks[name] = {"name": name}

    # The reverse proxy owns its network. An extra network of the same name is that network
    # too, so it is declared external even without a domain.
    if request.domains or options.proxy_network in networks:
        networks[options.proxy_network] = {"name": options.proxy_network, "external": True}
    return networks


def _render_volumes(request: DeployRequest, project: str) -> dict[str, Any]:
    named = sorted({volume.source for volume in request.volumes if not volume.is_bind})
    return {name: {"name": naming.volume_name(project, name)} for name in named}


def escape_interpolation(value: str) -> str:
    """Write each `$` as `$$`, so Compose interpolation yields the original text."""
    return value.replace("$", "$$")


def unescape_interpolation(value: str) -> str:
    """Turn each `$$` back into `$`, the inverse of `escape_interpolation`.

    A lone `$` stays as it is, although Compose would read it as the start of a variable.
    """
    return value.replace("$$", "$")


def escape_document(obj: Any) -> Any:
    """Return a copy with `escape_interpolation` applied to every string value, but not to mapping keys."""
    return _map_string_values(obj, escape_interpolation)


def unescape_document(obj: Any) -> Any:
    """Return a copy with `unescape_interpolation` applied to every string value, but not to mapping keys."""
    return _map_string_values(obj, unescape_interpolation)


def _map_string_values(obj: Any, transform: Callable[[str], str]) -> Any:
    if isinstance(obj, str):
        return transform(obj)
    if isinstance(obj, dict):
        return {key: _map_string_values(item, transform) for key, item in obj.items()}
    if isinstance(obj, list):
        return [_map_string_values(item, transform) for item in obj]
    return obj


def dump_spec(document: dict[str, Any]) -> str:
    """Serialize a document as deterministic YAML: sorted keys, block style, every string double-quoted."""
    return yaml.dump(
        document,
        Dumper=_QuotedDumper,
        sort_keys=True,
        default_flow_style=False,
        allow_unicode=True,
        width=YAML_WIDTH,
    )


def load_spec(yaml_text: str) -> dict[str, Any]:
    """Parse stored Compose YAML. The `$$` escapes stay, so pass the result to `unescape_document` before use."""
    document = yaml.safe_load(yaml_text)
    if not isinstance(document, dict):
        raise ValueError(f"Compose YAML must contain a mapping at the top level, not {type(document).__name__}")
    return document


@functools.cache
def _schema_validator() -> Any:
    # jsonschema is imported here, not at module level, because it is only a test dependency.
    import jsonschema

    schema_text = resources.files(__package__).joinpath(SCHEMA_RESOURCE).read_text(encoding="utf-8")
    schema = json.loads(schema_text)
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def validate_document(document: dict[str, Any]) -> None:
    """Validate a document against the bundled Compose JSON schema (draft-07).

    Raises ValueError that lists every schema error with the path of the invalid value.
    """
    errors = sorted(_schema_validator().iter_errors(document), key=lambda error: list(map(str, error.path)))
    if not errors:
        return
    lines = []
    for error in errors:
        path = ".".join(str(part) for part in error.path) or "(document)"
        lines.append(f"{path}: {error.message}")
    raise ValueError("Compose document does not match the Compose schema:\n" + "\n".join(lines))

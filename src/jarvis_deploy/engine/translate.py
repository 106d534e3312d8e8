"""Translation of one service of a stored Compose document into a Docker Engine container create body.

The functions here are pure: they read the document and return plain data, and they raise
TranslationError for anything they cannot express, instead of dropping it.
"""

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import SecretStr

from jarvis_deploy import naming
from jarvis_deploy.compose.render import unescape_document
from jarvis_deploy.engine.errors import TranslationError

# Service keys that container_config turns into the create body. Any other key, except extensions
# (`x-*`), raises TranslationError, so that a key added by the renderer cannot get lost here.
SUPPORTED_SERVICE_KEYS = frozenset(
    {"image", "restart", "environment", "labels", "ports", "expose", "networks", "volumes", "logging"}
)
PORT_PROTOCOLS = frozenset({"tcp", "udp", "sctp"})
RESTART_POLICIES = frozenset({"no", "always", "unless-stopped", "on-failure"})
# Docker's predefined networks, on which Docker rejects network-scoped aliases.
PREDEFINED_NETWORKS = frozenset({"bridge", "host", "none"})


@dataclass(frozen=True)
class NetworkAttachment:
    name: str
    aliases: list[str] = field(default_factory=list)


@dataclass
class ContainerPlan:
    """Create body of one container and the networks to connect after creation."""

    body: dict[str, Any]
    # Networks other than HostConfig.NetworkMode. The Engine API before 1.44 accepts only one
    # endpoint when a container is created, so the caller connects these one by one.
    networks: list[NetworkAttachment]
    # Real names of the named volumes that the container mounts.
    volumes: list[str] = field(default_factory=list)

    @property
    def primary_network(self) -> str:
        return self.body["HostConfig"]["NetworkMode"]


@dataclass(frozen=True)
class PortMapping:
    """One container port and its host binding; an empty `host_port` lets Docker choose one."""

    container_port: int
    protocol: str
    host_ip: str = ""
    host_port: str = ""

    @property
    def key(self) -> str:
        return f"{self.container_port}/{self.protocol}"


def compose_labels(project: str, service: str, number: int, config_hash: str) -> dict[str, str]:
    """Return the labels that `docker compose` puts on a service container, so that Compose tools list ours."""
    return {
        naming.COMPOSE_PROJECT: project,
        naming.COMPOSE_SERVICE: service,
        naming.COMPOSE_CONTAINER_NUMBER: str(number),
        naming.COMPOSE_CONFIG_HASH: config_hash,
        naming.COMPOSE_ONEOFF: "False",
    }


def container_config(document: dict[str, Any], service_name: str, labels: dict[str, str]) -> ContainerPlan:
    """Translate the service `service_name` of a stored Compose document into a create body.

    `labels` are merged over the service's own labels. String values of the document are
    unescaped once (`$$` becomes `$`), as Compose does when it interpolates.
    """
    document = unescape_document(document)
    services = document.get("services")
    if not isinstance(services, dict) or service_name not in services:
        raise TranslationError(f"service {service_name!r} is missing from the Compose document")
    service = services[service_name]
    if not isinstance(service, dict):
        raise TranslationError(f"service {service_name!r} must be a mapping, not {type(service).__name__}")

    unsupported = sorted(key for key in service if key not in SUPPORTED_SERVICE_KEYS and not key.startswith("x-"))
    if unsupported:
        raise TranslationError(
            f"service {service_name!r}: keys {', '.join(unsupported)} are not supported by the container translation"
        )

    image = service.get("image")
    if not isinstance(image, str) or not image:
        raise TranslationError(f"service {service_name!r} has no image")

    port_mappings = [mapping for spec in service.get("ports") or [] for mapping in parse_port(spec)]
    exposed = {mapping.key for mapping in port_mappings}
    exposed.update(_exposed_ports(service.get("expose") or []))
    jarvis_port = (service.get("x-jarvis") or {}).get("port")
    if jarvis_port is not None:
        exposed.add(f"{_parse_port_number(str(jarvis_port), 'x-jarvis.port')}/tcp")

    port_bindings: dict[str, list[dict[str, str]]] = {}
    for mapping in port_mappings:
        port_bindings.setdefault(mapping.key, []).append({"HostIp": mapping.host_ip, "HostPort": mapping.host_port})

    mounts, volume_names = _mounts(document, service.get("volumes") or [], service_name)
    attachments = _network_attachments(document, service.get("networks"), service_name)
    primary, further = attachments[0], attachments[1:]

    host_config: dict[str, Any] = {
        "PortBindings": port_bindings,
        "RestartPolicy": _restart_policy(service.get("restart")),
        "Mounts": mounts,
        "NetworkMode": primary.name,
    }
    if "logging" in service:
        host_config["LogConfig"] = _log_config(service["logging"])

    endpoint: dict[str, Any] = {}
    if primary.name not in PREDEFINED_NETWORKS:
        endpoint["Aliases"] = primary.aliases

    body: dict[str, Any] = {
        "Image": image,
        "Env": _environment(service.get("environment")),
        "Labels": {**_string_map(service.get("labels"), "labels"), **labels},
        "ExposedPorts": {key: {} for key in sorted(exposed)},
        "HostConfig": host_config,
        "NetworkingConfig": {"EndpointsConfig": {primary.name: endpoint}},
    }
    return ContainerPlan(body=body, networks=further, volumes=volume_names)


def inject_secrets(body: dict[str, Any], secrets: Mapping[str, SecretStr]) -> None:
    """Replace the placeholder value of each secret in the create body's `Env` with the secret's value.

    Raises TranslationError, naming the secrets, when one has no entry in `Env`.
    """
    if not secrets:
        return
    remaining = dict(secrets)
    environment = []
    for entry in body["Env"]:
        name = entry.partition("=")[0]
        secret = remaining.pop(name, None)
        environment.append(entry if secret is None else f"{name}={secret.get_secret_value()}")
    if remaining:
        raise TranslationError(f"secrets {', '.join(sorted(remaining))} have no entry in the service's environment")
    body["Env"] = environment


def parse_port(spec: str | int | dict[str, Any]) -> list[PortMapping]:
    """Parse one entry of a service's `ports` into mappings.

    An entry is in short syntax (`[ip:]host:container[/protocol]`), a bare port, or in long syntax.

    Ranges (`8000-8001:80-81`) give one mapping per port. A host range with a single container
    port stays one mapping, from which Docker picks a free host port.
    """
    if isinstance(spec, bool):
        raise TranslationError(f"ports: {spec!r} is not a port")
    if isinstance(spec, int):
        return [PortMapping(_parse_port_number(str(spec), "ports"), "tcp")]
    if isinstance(spec, dict):
        return [_parse_long_port(spec)]
    if not isinstance(spec, str):
        raise TranslationError(f"ports: {spec!r} is not a port")

    text, protocol = spec, "tcp"
    if "/" in text:
        text, protocol = text.rsplit("/", 1)
    _validate_protocol(protocol, spec)

    host_ip = ""
    if text.startswith("["):
        closing = text.find("]")
        if closing == -1 or text[closing + 1 : closing + 2] != ":":
            raise TranslationError(f"ports: {spec!r} has an unclosed IPv6 address; expected [ip]:host:container")
        host_ip = text[1:closing]
        parts = text[closing + 2 :].split(":")
        if len(parts) != 2:
            raise TranslationError(f"ports: {spec!r} must have the form [ip]:host:container")
        host, container = parts
    else:
        # rsplit keeps an IPv6 address without brackets (`::1:8080:80`) together.
        parts = text.rsplit(":", 2)
        if len(parts) == 1:
            host, container = "", parts[0]
        elif len(parts) == 2:
            host, container = parts
        else:
            host_ip, host, container = parts

    if host_ip:
        _validate_host_ip(host_ip, spec)
    container_ports = _parse_port_range(container, spec)
    if len(container_ports) == 1:
        if host:
            _parse_port_range(host, spec)
        return [PortMapping(container_ports[0], protocol, host_ip, host)]

    if not host:
        return [PortMapping(port, protocol, host_ip, "") for port in container_ports]
    host_ports = _parse_port_range(host, spec)
    if len(host_ports) != len(container_ports):
        raise TranslationError(
            f"ports: {spec!r} maps {len(host_ports)} host ports to {len(container_ports)} container ports"
        )
    return [
        PortMapping(container_port, protocol, host_ip, str(host_port))
        for host_port, container_port in zip(host_ports, container_ports, strict=True)
    ]


def _parse_long_port(spec: dict[str, Any]) -> PortMapping:
    if "target" not in spec:
        raise TranslationError(f"ports: {spec!r} has no target")
    protocol = str(spec.get("protocol") or "tcp")
    _validate_protocol(protocol, spec)
    host_ip = str(spec.get("host_ip") or "")
    if host_ip:
        _validate_host_ip(host_ip, spec)
    published = spec.get("published")
    host_port = "" if published is None else str(published)
    if host_port:
        _parse_port_range(host_port, spec)
    return PortMapping(_parse_port_number(str(spec["target"]), "ports"), protocol, host_ip, host_port)


def _validate_protocol(protocol: str, spec: object) -> None:
    if protocol not in PORT_PROTOCOLS:
        raise TranslationError(f"ports: {spec!r} has the invalid protocol {protocol!r}; expected tcp, udp or sctp")


def _validate_host_ip(host_ip: str, spec: object) -> None:
    try:
        ipaddress.ip_address(host_ip)
    except ValueError:
        raise TranslationError(f"ports: {spec!r} has an invalid host IP address {host_ip!r}") from None


def _parse_port_range(text: str, spec: object) -> list[int]:
    start_text, dash, end_text = text.partition("-")
    start = _parse_port_number(start_text, f"ports: {spec!r}")
    if not dash:
        return [start]
    end = _parse_port_number(end_text, f"ports: {spec!r}")
    if end < start:
        raise TranslationError(f"ports: {spec!r} has the range {text!r}, whose end is below its start")
    return list(range(start, end + 1))


def _parse_port_number(text: str, context: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise TranslationError(f"{context}: {text!r} is not a port number between 1 and 65535")
    return int(text)


def _exposed_ports(entries: Iterable[str | int]) -> set[str]:
    keys: set[str] = set()
    for entry in entries:
        text, _, protocol = str(entry).partition("/")
        protocol = protocol or "tcp"
        _validate_protocol(protocol, entry)
        keys.update(f"{port}/{protocol}" for port in _parse_port_range(text, entry))
    return keys


def _environment(environment: dict[str, Any] | list[str] | None) -> list[str]:
    """Return Docker's `KEY=value` list; values must be strings, because a YAML 1.1 `yes` or `0755` would change."""
    if environment is None:
        return []
    if isinstance(environment, list):
        for entry in environment:
            if not isinstance(entry, str) or "=" not in entry:
                raise TranslationError(
                    f"environment: entry {entry!r} has no value, "
                    "and taking a value from the host environment is not supported"
                )
        return list(environment)
    if not isinstance(environment, dict):
        raise TranslationError("environment must be a mapping or a list of KEY=value strings")

    entries = []
    for key, value in environment.items():
        if not isinstance(value, str):
            raise TranslationError(
                f"environment: the value of {key!r} is a YAML {type(value).__name__}, not a string; "
                "the rendered document must quote it"
            )
        entries.append(f"{key}={value}")
    return entries


def _string_map(value: dict[str, Any] | list[str] | None, section: str) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, list):
        result = {}
        for entry in value:
            if not isinstance(entry, str):
                raise TranslationError(f"{section}: entry {entry!r} is not a KEY=value string")
            key, _, item = entry.partition("=")
            result[key] = item
        return result
    if not isinstance(value, dict):
        raise TranslationError(f"{section} must be a mapping or a list of KEY=value strings")
    for key, item in value.items():
        if not isinstance(item, str):
            raise TranslationError(f"{section}: the value of {key!r} is a YAML {type(item).__name__}, not a string")
    return dict(value)


def _restart_policy(restart: str | None) -> dict[str, Any]:
    if restart is None:
        return {"Name": "no"}
    name, _, count = str(restart).partition(":")
    if name not in RESTART_POLICIES:
        raise TranslationError(
            f"restart: {restart!r} is not one of no, always, unless-stopped, on-failure[:max-retries]"
        )
    if not count:
        return {"Name": name}
    if name != "on-failure" or not count.isdigit():
        raise TranslationError(f"restart: {restart!r} is invalid because only on-failure takes a maximum retry count")
    return {"Name": name, "MaximumRetryCount": int(count)}


def _log_config(logging: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(logging, dict):
        raise TranslationError("logging must be a mapping with driver and options")
    options = logging.get("options") or {}
    if not isinstance(options, dict):
        raise TranslationError("logging.options must be a mapping")
    return {
        "Type": str(logging.get("driver") or "json-file"),
        # Log driver options are strings in the Engine API; Compose also accepts numbers here.
        "Config": {str(key): str(value) for key, value in options.items()},
    }


def _mounts(document: dict[str, Any], entries: list[Any], service_name: str) -> tuple[list[dict[str, Any]], list[str]]:
    mounts: list[dict[str, Any]] = []
    volume_names: list[str] = []
    for entry in entries:
        volume = _parse_short_volume(entry) if isinstance(entry, str) else entry
        if not isinstance(volume, dict):
            raise TranslationError(f"service {service_name!r}: volume entry {entry!r} is not a mapping or a string")

        kind = volume.get("type", "volume")
        target = volume.get("target")
        if not isinstance(target, str) or not target:
            raise TranslationError(f"service {service_name!r}: volume entry {entry!r} has no target")
        mount: dict[str, Any] = {"Type": kind, "Target": target, "ReadOnly": bool(volume.get("read_only", False))}

        if kind == "volume":
            source = volume.get("source")
            if not source:
                raise TranslationError(f"service {service_name!r}: anonymous volumes are not supported ({target})")
            name = resolve_name(document, "volumes", source)
            mount["Source"] = name
            volume_names.append(name)
            if (volume.get("volume") or {}).get("nocopy"):
                mount["VolumeOptions"] = {"NoCopy": True}
        elif kind == "bind":
            source = volume.get("source")
            if not isinstance(source, str) or not source.startswith("/"):
                raise TranslationError(
                    f"service {service_name!r}: bind mount source {source!r} must be an absolute path"
                )
            # NOTE: a Mounts entry of type bind fails when the host path is missing, unlike the
            # `-v` syntax, and Engine API 1.41 has no option to create it.
            mount["Source"] = source
            propagation = (volume.get("bind") or {}).get("propagation")
            if propagation:
                mount["BindOptions"] = {"Propagation": propagation}
        elif kind == "tmpfs":
            size = (volume.get("tmpfs") or {}).get("size")
            if size is not None:
                mount["TmpfsOptions"] = {"SizeBytes": int(size)}
        else:
            raise TranslationError(f"service {service_name!r}: volume type {kind!r} is not supported")
        mounts.append(mount)
    return mounts, volume_names


def _parse_short_volume(entry: str) -> dict[str, Any]:
    """Parse `source:target[:ro|rw]`; a source that starts with `/` is a bind mount."""
    parts = entry.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
        raise TranslationError(
            f"volumes: {entry!r} must have the form source:target[:ro|rw]; use the long syntax for paths with ':'"
        )
    source, target = parts[0], parts[1]
    return {
        "type": "bind" if source.startswith("/") else "volume",
        "source": source,
        "target": target,
        "read_only": len(parts) == 3 and parts[2] == "ro",
    }


def _network_attachments(
    document: dict[str, Any], networks: dict[str, Any] | list[str] | None, service_name: str
) -> list[NetworkAttachment]:
    """Return the service's networks in document order; the first one becomes HostConfig.NetworkMode."""
    if networks is None:
        networks = ["default"]
    if isinstance(networks, list):
        networks = {key: None for key in networks}
    if not isinstance(networks, dict) or not networks:
        raise TranslationError(f"service {service_name!r}: networks must be a non-empty mapping or list")

    attachments = []
    for key, options in networks.items():
        options = options or {}
        unsupported = sorted(set(options) - {"aliases"})
        if unsupported:
            raise TranslationError(
                f"service {service_name!r}: network options {', '.join(unsupported)} of {key!r} are not supported"
            )
        aliases = [service_name, *(alias for alias in options.get("aliases") or [] if alias != service_name)]
        attachments.append(NetworkAttachment(name=resolve_name(document, "networks", key), aliases=aliases))
    return attachments


def resolve_name(document: dict[str, Any], section: str, key: str) -> str:
    """Return the Docker name of a top-level network or volume, following Compose's rules.

    An entry's `name` wins. An external entry without one keeps its key. Otherwise the name is
    `<project>_<key>`, with the project taken from the document's top-level `name`.
    """
    entries = document.get(section) or {}
    if key not in entries:
        project = document.get("name")
        if section == "networks" and key == "default" and isinstance(project, str):
            return naming.default_network(project)
        raise TranslationError(
            f"{section[:-1]} {key!r} is used by a service but not declared under top-level {section}"
        )

    entry = entries[key] or {}
    if entry.get("name"):
        return str(entry["name"])
    if entry.get("external"):
        return key
    project = document.get("name")
    if not isinstance(project, str):
        raise TranslationError(f"{section[:-1]} {key!r} has no name and the document has no top-level name")
    return f"{project}_{key}"


"""Service settings, read from the environment with the prefix ``JARVIS_``."""

import hashlib
import ipaddress
import json
from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url

from jarvis_deploy.policy import normalize_host_path


def parse_host_port(value: str, field: str) -> tuple[str, int]:
    """Split `host:port` (an IPv4 address or a bracketed IPv6 address), raising ValueError that names `field`."""
    host, separator, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        number = 0
    if not separator or not 0 < number < 65536:
        raise ValueError(f"{field} must be an IP address and port such as 127.0.0.1:8053, not {value!r}")
    return host, number


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="JARVIS_", env_file=".env", extra="ignore")

    database_url: str = Field(
        "postgresql+asyncpg://postgres@127.0.0.1:5432/jarvis_deploy",
        description="SQLAlchemy URL of the PostgreSQL database (asyncpg driver).",
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL used by the arq queue.")
    docker_url: str = Field(
        "unix:///var/run/docker.sock", description="Docker Engine API endpoint."
    )
    queue_name: str = Field("jarvis-deploy", description="arq queue that carries deployment jobs.")

    proxy_network: str = Field(
        "caddy",
        description="Docker network shared with the reverse proxy; containers with a domain join it.",
    )
    publish_host_ip: str = Field(
        "",
        description="Host address that direct port mappings bind to; empty binds every interface, as Compose does.",
    )
    upstream_mode: Literal["network", "loopback"] = Field(
        "network",
        description=(
            "How Caddy reaches containers: `network` dials <container name>:<port> over the proxy network; "
            "`loopback` publishes the port on 127.0.0.1 and dials that, for a Caddy running on the host."
        ),
    )
    upstream_resolver: str = Field(
        "",
        description=(
            "`host:port` (UDP) where `jarvis-deploy resolver` answers Caddy's lookups of project upstreams. Set, "
            "with `upstream_mode=loopback`, each routed container is published on an address of its own from "
            "`upstream_address_range`, and a switch changes only the lookup's answer, so Caddy does not reload. "
            "Empty: a switch changes the route's upstream list through the admin API, and Caddy reloads."
        ),
    )
    upstream_lookup_refresh: float = Field(
        0.01,
        gt=0,
        le=60,
        description=(
            "Seconds Caddy caches a project's upstream lookup. A switch reaches every new request this long "
            "after the resolver returns the new addresses; each busy project costs Caddy one lookup per interval."
        ),
    )
    upstream_address_range: str = Field(
        "",
        description=(
            "IPv4 loopback network whose addresses routed containers are published on when `upstream_resolver` "
            "is set. Empty picks a /16 from 127.64.0.0 to 127.191.0.0 by the instance digest, so services on one "
            "host most likely get different ranges."
        ),
    )
    caddy_admin_url: str = Field(
        "http://127.0.0.1:2019", description="Caddy admin API; empty leaves routing to caddy-docker-proxy labels."
    )
    caddy_server: str = Field("jarvis", description="Name of the Caddy HTTP server that contains the service's routes.")
    caddy_listen: list[str] = Field(
        default_factory=lambda: [":80"], description="Listen addresses of that server when the service creates it."
    )
    drain_seconds: float = Field(
        5.0, ge=0, description="Seconds old containers keep running after traffic moved away, for requests in flight."
    )
    watch_seconds: float = Field(
        30.0,
        ge=0,
        description="Seconds after a switch during which an unhealthy new version sends traffic back to the old one.",
    )
    log_max_size: str = Field("10m", description="json-file log driver: maximum size of one log file.")
    log_max_file: int = Field(3, ge=1, description="json-file log driver: number of rotated log files kept.")
    stop_timeout: int = Field(
        10, ge=0, description="Seconds between SIGTERM and SIGKILL when a container is stopped."
    )
    logs_max_tail: int = Field(
        5000, ge=1, description="Largest `tail` the logs endpoint accepts."
    )

    worker_max_jobs: int = Field(10, ge=1, description="Jobs one worker runs at the same time.")
    worker_poll_delay: float = Field(
        0.1, gt=0, description="Seconds between two polls of the queue when it is empty."
    )
    job_timeout: int = Field(
        1800,
        ge=10,
        description=(
            "Seconds one deployment may run; then it fails, its containers are removed and the last good "
            "version serves again."
        ),
    )
    shutdown_grace_seconds: int = Field(
        5,
        ge=0,
        description=(
            "On SIGTERM the worker takes no new job and lets running deployments finish for this long; then it "
            "removes what they started, brings the last good version back and returns them to the queue for "
            "another worker. Keep it, plus the time that clean-up takes, below your supervisor's stop timeout."
        ),
    )
    idempotency_key_ttl: float = Field(
        86400.0, gt=0, description="Seconds an Idempotency-Key of a deploy request is remembered."
    )
    retain_deployments: int = Field(
        100,
        ge=0,
        description=(
            "Deployments per project, newest first, whose spec and events are kept; older finished ones keep "
            "only their summary row. 0 keeps everything. Live and queued deployments are always kept."
        ),
    )
    heartbeat_timeout: float = Field(
        30.0,
        ge=10,
        description="Seconds without a heartbeat after which an in-progress deployment whose lock is free counts as abandoned.",
    )

    webhook_max_tries: int = Field(
        4, ge=1, le=20, description="Attempts to deliver one webhook event, the first included, before it is dropped."
    )
    webhook_timeout: float = Field(
        10.0, gt=0, le=300, description="Seconds one webhook POST may take, connecting included."
    )

    secret_key: SecretStr | None = Field(
        None,
        description=(
            "Fernet key (32 bytes, URL-safe base64) that encrypts the values of deployment secrets. "
            "Unset, requests with secrets are rejected with 503."
        ),
    )

    allowed_bind_roots: list[str] = Field(
        default_factory=list,
        description=(
            "Absolute host directories that bind mounts may use, with everything below them (JSON list). "
            "Empty rejects every bind mount."
        ),
    )
    allow_docker_socket: bool = Field(
        False,
        description=(
            "Allow bind mounts of the Docker socket or a directory that contains it, which gives root on the host."
        ),
    )
    allow_privileged_ports: bool = Field(False, description="Allow host ports below 1024.")
    allowed_registries: list[str] = Field(
        default_factory=list,
        description=(
            "Registries images may come from, as `host` or `host:port` (JSON list); `docker.io` covers references "
            "without a registry. Empty allows every registry."
        ),
    )
    max_body_bytes: int = Field(1024 * 1024, ge=1, description="Largest request body the API reads, in bytes.")

    stream_heartbeat_seconds: float = Field(
        15.0, gt=0, description="Seconds between two heartbeat comments on an idle Server-Sent Events stream."
    )
    stream_max_seconds: float = Field(
        3600.0,
        gt=0,
        description="Seconds one stream may stay open before the server ends it. Event streams resume with Last-Event-ID.",
    )
    stream_poll_seconds: float = Field(
        0.25, gt=0, le=10, description="Seconds between two reads of a deployment's events from the database."
    )
    stream_queue_lines: int = Field(
        1000, ge=1, description="Log lines buffered between the Docker Engine and a slow client before reading pauses."
    )

    log_level: str = Field("INFO", description="Log level of the service's own logs.")
    pause_after_stages: list[str] = Field(
        default_factory=list,
        description=(
            "Fault injection for crash tests: after recording an event of one of these stages (for example "
            '`["switched"]`), the worker holds the deployment there for an hour, so a test can kill it at that '
            "step. Leave empty in production."
        ),
    )
    log_json: bool = Field(False, description="Write the service's logs as JSON lines.")

    @property
    def instance_id(self) -> str:
        """Identity of this service instance: a digest of its database's host, port and name."""
        url = make_url(self.database_url)
        return hashlib.sha256(f"{url.host}:{url.port}/{url.database}".encode()).hexdigest()[:16]

    @property
    def resolved_upstreams(self) -> bool:
        """Whether switches go through the upstream resolver instead of a Caddy reload."""
        return bool(self.upstream_resolver) and self.upstream_mode == "loopback"

    @property
    def upstream_network(self) -> str:
        """The network of `upstream_address_range`, or the one derived from the instance when it is empty."""
        if self.upstream_address_range:
            return self.upstream_address_range
        return f"127.{64 + int(self.instance_id[:4], 16) % 128}.0.0/16"

    @field_validator("upstream_resolver")
    @classmethod
    def _check_resolver_address(cls, value: str) -> str:
        if value:
            parse_host_port(value, "upstream_resolver")
        return value

    @field_validator("upstream_address_range")
    @classmethod
    def _check_address_range(cls, value: str) -> str:
        if not value:
            return value
        try:
            network = ipaddress.IPv4Network(value)
        except ValueError as error:
            raise ValueError(f"{value!r} is not an IPv4 network such as 127.77.0.0/16 ({error})") from None
        if not network.subnet_of(ipaddress.IPv4Network("127.0.0.0/8")) or network.num_addresses < 4:
            raise ValueError(f"{value!r} must lie inside 127.0.0.0/8 and hold at least 4 addresses, such as 127.77.0.0/16")
        return str(network)

    @field_validator("allowed_bind_roots", "allowed_registries", mode="before")
    @classmethod
    def _decode_json_list(cls, value: object) -> object:
        # The environment source decodes JSON itself, but keyword arguments such as
        # Settings(**environment) pass the text through.
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f'must be a JSON list of strings, such as ["/srv/apps"], not {value!r}') from error

    @field_validator("allowed_bind_roots")
    @classmethod
    def _normalize_bind_roots(cls, roots: list[str]) -> list[str]:
        normalized = []
        for root in roots:
            if not root.startswith("/"):
                raise ValueError(f"bind root {root!r} must be an absolute path")
            normalized.append(normalize_host_path(root))
        return normalized

    @field_validator("allowed_registries")
    @classmethod
    def _normalize_registries(cls, registries: list[str]) -> list[str]:
        return [registry.strip().lower() for registry in registries]


@lru_cache
def get_settings() -> Settings:
    return Settings()

"""Names and labels of the Docker objects the service creates, derived from the project and deployment."""

import re

# Compose v2 names a container `<project>-<service>-<number>`, and the service is named after the
# project: 2 * 29 + 2 separators + 2 digits of replica number = 62, within the 63 characters of a
# DNS label, which is what Docker uses as the container's host name on user networks.
PROJECT_NAME_MAX_LENGTH = 29
PROJECT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")

LABEL_PREFIX = "dev.jarvis-deploy"
LABEL_MANAGED = f"{LABEL_PREFIX}.managed"
LABEL_PROJECT = f"{LABEL_PREFIX}.project"
LABEL_DEPLOYMENT = f"{LABEL_PREFIX}.deployment"
LABEL_VERSION = f"{LABEL_PREFIX}.version"
LABEL_COLOR = f"{LABEL_PREFIX}.color"
# Loopback address a routed container publishes its port on, kept while the container is stopped.
LABEL_UPSTREAM_ADDRESS = f"{LABEL_PREFIX}.upstream-address"
# Which service instance (database) created the object, so instances sharing a Docker Engine never
# clean up each other's containers.
LABEL_INSTANCE = f"{LABEL_PREFIX}.instance"

COMPOSE_PROJECT = "com.docker.compose.project"
COMPOSE_SERVICE = "com.docker.compose.service"
COMPOSE_CONTAINER_NUMBER = "com.docker.compose.container-number"
COMPOSE_CONFIG_HASH = "com.docker.compose.config-hash"
COMPOSE_ONEOFF = "com.docker.compose.oneoff"
COMPOSE_NETWORK = "com.docker.compose.network"
COMPOSE_VOLUME = "com.docker.compose.volume"


def container_name(project: str, version: int, replica: int) -> str:
    """Name of one container of one deployment; unique per deployment so a rerun finds its own."""
    return f"{project}-v{version}-{replica}"


def default_network(project: str) -> str:
    return f"{project}_default"


def volume_name(project: str, volume: str) -> str:
    return f"{project}_{volume}"

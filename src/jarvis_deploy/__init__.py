"""jarvis-deploy: runs container images on a Docker host from rendered Compose documents."""

__version__ = "0.1.0"

"""Commands that read the settings exit with one line per invalid variable instead of a traceback."""

import pytest
from typer.testing import CliRunner

from jarvis_deploy.cli import app
from jarvis_deploy.config import get_settings


@pytest.fixture(autouse=True)
def fresh_settings():
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.mark.parametrize("command", ["resolver", "worker", "api", "migrate"])
def test_invalid_variable_exits_with_message(command: str) -> None:
    result = CliRunner().invoke(app, [command], env={"JARVIS_UPSTREAM_RESOLVER": "resolver.example:53"})

    assert result.exit_code == 2
    assert "invalid JARVIS_UPSTREAM_RESOLVER" in result.output
    assert "Traceback" not in result.output


def test_resolver_needs_address() -> None:
    result = CliRunner().invoke(app, ["resolver"], env={"JARVIS_UPSTREAM_RESOLVER": ""})

    assert result.exit_code == 2
    assert "JARVIS_UPSTREAM_RESOLVER is not set" in result.output

"""Deployment strategies, looked up by the name stored on the deployment."""

from jarvis_deploy.strategies.base import DeploymentFailed, Strategy
from jarvis_deploy.strategies.blue_green import BlueGreenStrategy
from jarvis_deploy.strategies.recreate import RecreateStrategy
from jarvis_deploy.strategies.rolling import RollingStrategy

STRATEGIES: dict[str, Strategy] = {
    strategy.name: strategy for strategy in (RecreateStrategy(), BlueGreenStrategy(), RollingStrategy())
}


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise DeploymentFailed(
            f"strategy {name!r} is not available in this worker; available: {', '.join(sorted(STRATEGIES))}"
        ) from None

"""Command line: `jarvis-deploy migrate | api | worker`."""

import asyncio
from pathlib import Path

import typer
from sqlalchemy.engine import make_url

app = typer.Typer(help="jarvis-deploy: a deployment service for Docker hosts.", no_args_is_help=True)

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]


def _alembic_config(database_url: str):
    from alembic.config import Config

    ini = REPOSITORY_ROOT / "alembic.ini"
    if not ini.exists():
        raise typer.BadParameter(f"alembic.ini not found at {ini}; run from a checkout of jarvis-deploy")
    config = Config(str(ini))
    config.attributes["database_url"] = database_url
    return config


async def _create_database_if_missing(database_url: str) -> bool:
    import asyncpg

    url = make_url(database_url)
    name = url.database
    server = url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    connection = await asyncpg.connect(server)
    try:
        exists = await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists:
            return False
        quoted = '"' + name.replace('"', '""') + '"'
        await connection.execute(f"CREATE DATABASE {quoted}")
        return True
    finally:
        await connection.close()


@app.command()
def migrate(
    create_database: bool = typer.Option(True, help="Create the database first when it does not exist."),
) -> None:
    """Apply all database migrations (alembic upgrade head)."""
    from alembic import command

    from jarvis_deploy.config import get_settings

    database_url = get_settings().database_url
    if create_database and asyncio.run(_create_database_if_missing(database_url)):
        typer.echo(f"created database {make_url(database_url).database}")
    command.upgrade(_alembic_config(database_url), "head")
    typer.echo("database schema is up to date")


@app.command()
def api(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="TCP port to listen on."),
) -> None:
    """Run the HTTP API."""
    import uvicorn

    uvicorn.run(
        "jarvis_deploy.api.app:create_app_from_environment",
        factory=True,
        host=host,
        port=port,
        log_level="warning",
        proxy_headers=False,
    )


@app.command()
def worker() -> None:
    """Run a worker that carries out queued deployments."""
    from arq.worker import run_worker

    from workers.settings import WorkerSettings

    run_worker(WorkerSettings)  # type: ignore[arg-type]


if __name__ == "__main__":
    app()

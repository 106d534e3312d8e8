"""Command line: `jarvis-deploy migrate | api | worker | resolver | token`."""

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


def _settings():
    """Return the settings, or exit with status 2 and one line per invalid variable."""
    from pydantic import ValidationError

    from jarvis_deploy.config import get_settings

    try:
        return get_settings()
    except ValidationError as error:
        for item in error.errors():
            name = "JARVIS_" + "_".join(str(part) for part in item["loc"]).upper()
            typer.echo(f"invalid {name}: {item['msg'].removeprefix('Value error, ')}", err=True)
        raise typer.Exit(2) from None


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

    database_url = _settings().database_url
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

    _settings()
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

    _settings()
    from workers.settings import WorkerSettings

    run_worker(WorkerSettings)  # type: ignore[arg-type]


@app.command()
def resolver() -> None:
    """Serve Caddy's upstream lookups on JARVIS_UPSTREAM_RESOLVER (UDP) from the database."""
    from jarvis_deploy.config import parse_host_port
    from jarvis_deploy.logging_config import configure_logging
    from jarvis_deploy.proxy.resolver import serve

    settings = _settings()
    if not settings.upstream_resolver:
        typer.echo("JARVIS_UPSTREAM_RESOLVER is not set. Set it to the UDP address to listen on, such as 127.0.0.1:8053", err=True)
        raise typer.Exit(2)
    configure_logging(settings.log_level, settings.log_json)
    if settings.upstream_mode != "loopback":
        typer.echo(
            f"warning: JARVIS_UPSTREAM_MODE is {settings.upstream_mode!r}; workers use the resolver only with `loopback`",
            err=True,
        )
    host, port = parse_host_port(settings.upstream_resolver, "upstream_resolver")

    try:
        asyncio.run(serve(settings.database_url, settings.instance_id, host, port))
    except KeyboardInterrupt:
        pass
    except OSError as error:
        typer.echo(f"cannot listen on udp {settings.upstream_resolver}: {error}", err=True)
        raise typer.Exit(1) from None


token_app = typer.Typer(help="Create, list and revoke API tokens.", no_args_is_help=True)
app.add_typer(token_app, name="token")


async def _with_session(work):
    from jarvis_deploy.db.session import create_engine, create_sessionmaker

    engine = create_engine(_settings().database_url)
    try:
        async with create_sessionmaker(engine)() as session:
            result = await work(session)
            await session.commit()
            return result
    finally:
        await engine.dispose()


@token_app.command("create")
def token_create(
    name: str = typer.Option(..., help="Name of the token, shown in the audit trail."),
    scope: list[str] = typer.Option(..., help="read, deploy or admin; repeat for several."),
    project: list[str] = typer.Option(None, help="Project the token may touch; repeat for several. Default: all."),
) -> None:
    """Create a token and print it; it is shown only once."""
    from pydantic import ValidationError

    from jarvis_deploy.auth import service
    from jarvis_deploy.auth.schemas import TokenCreate
    from jarvis_deploy.errors import Conflict

    try:
        body = TokenCreate(name=name, scopes=scope, projects=project or None)
    except ValidationError as error:
        for item in error.errors():
            typer.echo(f"invalid {'.'.join(str(part) for part in item['loc'])}: {item['msg']}", err=True)
        raise typer.Exit(2) from None

    async def work(session):
        return await service.create(session, name=body.name, scopes=body.scopes, projects=body.projects)

    try:
        _, token = asyncio.run(_with_session(work))
    except Conflict as error:
        typer.echo(error.detail, err=True)
        raise typer.Exit(1) from None
    typer.echo(token)


@token_app.command("list")
def token_list() -> None:
    """List tokens: name, scopes, projects, created, last used, revoked (never the token)."""
    from jarvis_deploy.auth import service

    rows = asyncio.run(_with_session(service.list_all))
    for row in rows:
        projects = ",".join(row.projects) if row.projects is not None else "*"
        typer.echo(
            f"{row.id}  {row.name}  scopes={','.join(row.scopes)}  projects={projects}  "
            f"created={row.created_at:%Y-%m-%dT%H:%M:%SZ}  last_used={row.last_used_at or '-'}  "
            f"revoked={row.revoked_at or '-'}"
        )


@token_app.command("revoke")
def token_revoke(token_id: str = typer.Argument(..., help="Id of the token, from `token list`.")) -> None:
    """Revoke a token."""
    import uuid

    from jarvis_deploy.auth import service
    from jarvis_deploy.errors import NotFound

    try:
        identifier = uuid.UUID(token_id)
    except ValueError:
        typer.echo(f"invalid token id {token_id!r}; pass the id that `token list` prints", err=True)
        raise typer.Exit(2) from None
    try:
        asyncio.run(_with_session(lambda session: service.revoke(session, identifier)))
    except NotFound as error:
        typer.echo(error.detail, err=True)
        raise typer.Exit(1) from None
    typer.echo(f"revoked {identifier}")


if __name__ == "__main__":
    app()

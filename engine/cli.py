"""The `cjm` command."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from engine.config import Settings
from engine.db.migrate import DatabaseNotMigrated
from engine.journey import JourneyErrors, load_journeys
from engine.runtime import Runtime

app = typer.Typer(
    help="cjm runs customer journey maps: YAML maps of a segment, executed as state machines.",
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="The database schema.", no_args_is_help=True)
keys_app = typer.Typer(help="The write and admin keys.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")


def main() -> None:
    app()


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ValueError as error:
        _fail(str(error))


def _fail(message: str) -> NoReturn:
    typer.echo(message, err=True)
    raise typer.Exit(1)


def _configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # A sweep still running when the next is due is skipped on purpose: not worth a warning.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)


async def _start(runtime: Runtime) -> None:
    """Start, or say in plain words why not and exit 1."""
    try:
        await runtime.start()
    except JourneyErrors as error:
        _fail(f"{error}\nnot starting: the journeys above are invalid")
    except DatabaseNotMigrated as error:
        _fail(str(error))


def _banner(runtime: Runtime, listening: str | None) -> None:
    settings = runtime.settings
    if listening:
        typer.echo(f"cjm listening on {listening}  (API docs at {listening}/docs)")
    typer.echo(f"database: {settings.database_url}")
    journeys = ", ".join(
        f"{journey.id} v{journey.version}"
        for journey in runtime.book.current.values()
        if journey.id not in runtime.book.retired
    )
    typer.echo(f"journeys: {journeys or 'none'}")
    for name in ("write", "admin"):
        generated = runtime.generated_keys.get(name)
        if generated:
            typer.echo(f"{name} key: {generated}   (generated now and shown only once: keep it)")
        elif getattr(settings, f"{name}_key"):
            typer.echo(f"{name} key: from CJM_{name.upper()}_KEY")
        else:
            typer.echo(f"{name} key: stored (a new one: cjm keys rotate {name})")


@app.command()
def serve(
    worker: Annotated[
        bool, typer.Option(help="Also process events and timers in this process.")
    ] = True,
) -> None:
    """Run the HTTP API with the worker and the timer sweep (embedded SQLite by default)."""
    import uvicorn

    from engine.api.app import create_app

    settings = _settings()
    _configure_logging()

    async def run() -> None:
        runtime = Runtime(settings, run_worker=worker)
        await _start(runtime)
        try:
            _banner(runtime, f"http://{settings.host}:{settings.port}")
            config = uvicorn.Config(
                create_app(runtime),
                host=settings.host,
                port=settings.port,
                log_level="warning",
                access_log=False,
            )
            await uvicorn.Server(config).serve()
        finally:
            await runtime.stop()

    asyncio.run(run())


@app.command("worker")
def worker_command() -> None:
    """Run a worker alone: events, timers and merges, sharing a PostgreSQL with others."""
    settings = _settings()
    _configure_logging()

    async def run() -> None:
        runtime = Runtime(settings)
        await _start(runtime)
        if runtime.db.is_sqlite:
            typer.echo("note: on SQLite `cjm serve` already runs a worker; one is enough")
        _banner(runtime, None)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopping.set)
        try:
            await stopping.wait()
        finally:
            await runtime.stop()

    asyncio.run(run())


@app.command()
def validate(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(help="Journey files or folders (default: CJM_JOURNEYS_DIR)."),
    ] = None,
    templates: Annotated[
        Path | None, typer.Option(help="Email templates folder (default: CJM_TEMPLATES_DIR).")
    ] = None,
) -> None:
    """Check journeys and their templates; every error as file:line: message, exit 1."""
    settings = _settings()
    try:
        journeys = load_journeys(
            paths or [settings.journeys_dir], templates or settings.templates_dir
        )
    except JourneyErrors as error:
        for item in error.errors:
            typer.echo(str(item))
        raise typer.Exit(1) from None
    names = ", ".join(f"{journey.id} v{journey.version}" for journey in journeys)
    typer.echo(f"ok: {len(journeys)} journeys ({names})")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Migrate the database to the schema this version of cjm needs."""
    from engine.db.migrate import upgrade

    settings = _settings()
    asyncio.run(upgrade(settings.database_url))
    typer.echo(f"database at the current schema: {settings.database_url}")


@keys_app.command("rotate")
def keys_rotate(name: Annotated[str, typer.Argument(help="write or admin")]) -> None:
    """Replace a key with a new one, printed once; running processes drop the old one
    within seconds."""
    from engine.db.database import Database
    from engine.keys import ApiKeys, KeyFromSettings

    if name not in ("write", "admin"):
        _fail(f"no key named {name!r}: use write or admin")
    settings = _settings()

    async def run() -> dict[str, str]:
        db = Database(settings.database_url)
        try:
            keys, generated = await ApiKeys.load(db, settings)
            generated[name] = await keys.rotate(db, name)  # type: ignore[arg-type]
            return generated
        finally:
            await db.close()

    try:
        new_keys = asyncio.run(run())
    except KeyFromSettings as error:
        _fail(str(error))
    for key_name, key in sorted(new_keys.items()):
        typer.echo(f"new {key_name} key: {key}   (shown only once: keep it)")


if __name__ == "__main__":
    main()

"""The `cjm` command."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import os
import re
import secrets
import signal
import sys
from collections.abc import Callable, Collection, Coroutine, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO, Literal, NoReturn, TypeVar

import typer
from jinja2 import TemplateError

from channels.audiences.export import META_PAGE, BadCursor, Cursor, csv_export, meta_page
from channels.audiences.store import count_members, last_number, number_changes
from channels.email import EmailTemplates, OfferView, RenderedEmail
from channels.email.templates import SAMPLE_LEAD, SAMPLE_UNSUBSCRIBE_URL
from engine.config import Settings
from engine.db.migrate import DatabaseNotMigrated
from engine.journey import Journey, JourneyErrors, JourneySet, load_journey_file, load_journeys
from engine.journey.model import EmailSend
from engine.metrics import serve_metrics
from engine.runtime import (
    Runtime,
    WorkerNotStarted,
    WorkerProcess,
    load_checked_journeys,
    tune_garbage_collector,
)

if TYPE_CHECKING:
    from engine.db.database import Database

# Lead ids are 64-bit database ids.
MAX_LEAD_ID = 2**63 - 1

T = TypeVar("T")

app = typer.Typer(
    help="cjm runs customer journey maps: YAML maps of a segment, executed as state machines.",
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="The database schema.", no_args_is_help=True)
keys_app = typer.Typer(help="The write and admin keys.", no_args_is_help=True)
audiences_app = typer.Typer(help="Audiences for ad platforms.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
app.add_typer(audiences_app, name="audiences")


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
    except (DatabaseNotMigrated, WorkerNotStarted) as error:
        _fail(str(error))
    tune_garbage_collector()


def _banner(runtime: Runtime, listening: str | None) -> None:
    settings = runtime.settings
    if listening:
        typer.echo(f"cjm listening on {listening}  (API docs at {listening}/docs)")
    typer.echo(f"database: {settings.database_url}")
    if settings.insecure_links:
        typer.echo(
            f"warning: CJM_BASE_URL is {settings.base_url}: email links and one-click "
            "unsubscribe should be HTTPS for mail providers to trust them",
            err=True,
        )
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
        bool, typer.Option(help="Also process events, timers, emails and audiences.")
    ] = True,
    worker_process: Annotated[
        bool,
        typer.Option(
            help="Do that work in a child process, started and stopped with the server, "
            "so that ingestion and the worker each have a core (one process by default)."
        ),
    ] = False,
) -> None:
    """Run the HTTP API with the worker and the timer sweep (embedded SQLite by default)."""
    import uvicorn

    from engine.api.app import create_app

    if worker_process and not worker:
        _fail("--worker-process runs the worker in a child process: drop --no-worker")
    settings = _settings()
    _configure_logging()
    worker_gave_up = False

    async def run() -> None:
        nonlocal worker_gave_up
        server: uvicorn.Server | None = None

        def give_up() -> None:
            nonlocal worker_gave_up
            worker_gave_up = True
            if server is not None:
                server.should_exit = True

        # The worker in a process of its own: the API and the worker each get a core,
        # where one event loop makes them take turns on one.
        child = WorkerProcess(on_give_up=give_up) if worker_process else None
        runtime = Runtime(
            settings,
            run_worker=worker and child is None,
            worker_process=child,
            writers_take_turns=child is not None,
        )
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
            server = uvicorn.Server(config)
            if not worker_gave_up:
                await server.serve()
        finally:
            await runtime.stop()

    _run_fast(run())
    if worker_gave_up:
        _fail("cjm serve stopped: its worker process keeps exiting (see the errors above)")


def _run_fast(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` on uvloop where it is installed (not on Windows): the HTTP hot path,
    the database drivers and the email sender's SMTP connections spend a good part of
    their time in the event loop, which uvloop makes cheaper."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


@app.command("worker")
def worker_command(
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=65535,
            help="Serve this worker's Prometheus metrics on this port (on CJM_HOST).",
        ),
    ] = None,
    parent_pipe: Annotated[
        int | None,
        typer.Option(
            hidden=True,
            help="The worker process of `cjm serve --worker-process`: the pipe to its "
            "server (a byte: events were stored; end of file: the server is gone, stop).",
        ),
    ] = None,
    ready_pipe: Annotated[
        int | None,
        typer.Option(
            hidden=True,
            help="The worker process of `cjm serve --worker-process`: a byte is written "
            "here once started.",
        ),
    ] = None,
) -> None:
    """Run a worker alone: events, timers and merges, sharing a PostgreSQL with others."""
    settings = _settings()
    _configure_logging()

    async def run() -> None:
        # The worker process of `cjm serve --worker-process` shares its server's SQLite
        # writer and takes turns with it.
        runtime = Runtime(settings, writers_take_turns=parent_pipe is not None)
        await _start(runtime)
        if ready_pipe is not None:
            os.write(ready_pipe, b"\x01")
            os.close(ready_pipe)
        if parent_pipe is None:
            if runtime.db.is_sqlite:
                typer.echo("note: on SQLite `cjm serve` already runs a worker; one is enough")
            _banner(runtime, None)
        if metrics_port is not None:
            try:
                serve_metrics(metrics_port, settings.host)
            except OSError as error:
                await runtime.stop()
                _fail(f"cannot serve metrics on {settings.host}:{metrics_port}: {error}")
            typer.echo(f"metrics: http://{settings.host}:{metrics_port}/metrics")
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopping.set)
        if parent_pipe is not None:
            loop.add_reader(parent_pipe, _heed_server, parent_pipe, runtime, stopping)
        try:
            await stopping.wait()
        finally:
            if parent_pipe is not None:
                loop.remove_reader(parent_pipe)
            await runtime.stop()

    _run_fast(run())


def _heed_server(pipe: int, runtime: Runtime, stopping: asyncio.Event) -> None:
    """Wake the worker for each byte from `cjm serve`; stop at end of file (the server
    is gone, however it ended)."""
    try:
        received = os.read(pipe, 4096)
    except OSError:
        received = b""
    if received:
        runtime.worker.wake()
    else:
        asyncio.get_running_loop().remove_reader(pipe)
        logging.getLogger("cjm").warning("the server process is gone: the worker stops")
        stopping.set()


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
        journeys = load_checked_journeys(
            paths or [settings.journeys_dir], templates or settings.templates_dir
        )
    except JourneyErrors as error:
        for item in error.errors:
            typer.echo(str(item))
        raise typer.Exit(1) from None
    names = ", ".join(f"{journey.id} v{journey.version}" for journey in journeys)
    typer.echo(f"ok: {len(journeys)} journeys ({names})")


@app.command()
def preview(
    template: Annotated[str, typer.Argument(help="A template name, like catalog.")],
    traits: Annotated[
        Path | None, typer.Option(help="A JSON object of the lead's traits (default: a sample).")
    ] = None,
    lead_id: Annotated[
        int | None,
        typer.Option(
            "--lead",
            help="A lead in the database (CJM_DATABASE_URL): its traits, and its journey and "
            "stage when it is in one that sends the template.",
        ),
    ] = None,
    offer: Annotated[
        str | None, typer.Option(help="An offer of the journey, shown with a sample code.")
    ] = None,
    journey: Annotated[
        str | None,
        typer.Option(help="The journey sending it (default: the first that does)."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write a .html, .txt or .eml file.")
    ] = None,
) -> None:
    """Render an email template for a lead: print it, or write it to a file."""
    settings = _settings()
    if lead_id is not None and traits is not None:
        _fail("--lead and --traits cannot be used together: preview a lead or given traits")
    found = _read_lead(settings.database_url, lead_id) if lead_id is not None else None
    if found is not None:
        lead: Mapping[str, Any] = found.traits
    else:
        lead = _read_traits(traits) if traits else SAMPLE_LEAD
    stages = found.stages if found is not None else {}
    sender = _sending_journey(settings, template, journey, enrolled=stages)
    if sender is not None and sender.id in stages:
        stage = _current_stage(sender, stages[sender.id])
    else:
        stage = _sending_stage(sender, template)
    try:
        rendered = EmailTemplates(settings.templates_dir).render(
            template,
            lead=lead,
            offer=_sample_offer(sender, offer) if offer else None,
            journey=(sender.id, sender.name) if sender else ("preview", "Preview"),
            stage=stage,
            # Never a real signed link: a preview is not the lead's to unsubscribe with.
            unsubscribe_url=SAMPLE_UNSUBSCRIBE_URL,
        )
    except TemplateError as error:
        _fail(f"{template}: {error}")
    if output is None:
        typer.echo(f"Subject: {rendered.subject}\n\n{rendered.text}\n{rendered.html}")
        return
    if output.suffix == ".eml":
        output.write_bytes(_message(settings, lead, rendered).as_bytes())
    elif output.suffix in (".html", ".txt"):
        output.write_text(rendered.html if output.suffix == ".html" else rendered.text, "utf-8")
    else:
        _fail(f"cannot write {output}: use a .html, .txt or .eml file")
    typer.echo(f"Subject: {rendered.subject}\nwritten to {output}")


def _read_traits(path: Path) -> dict[str, Any]:
    try:
        traits = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        _fail(f"cannot read traits from {path}: {error}")
    if not isinstance(traits, dict):
        _fail(f"{path}: the traits must be a JSON object")
    return traits


def _sending_journey(
    settings: Settings,
    template: str,
    journey_id: str | None,
    *,
    enrolled: Collection[str] = (),
) -> Journey | None:
    """The journey named, else the first that sends the template and the lead is in (of
    the `enrolled` journey ids), else the first that sends it: its brand and offers make
    the preview look like the real email."""
    journeys = _journeys(settings)
    if journey_id is not None:
        if journey_id not in journeys:
            _fail(f"no journey {journey_id!r}; there are: {', '.join(journeys.ids) or 'none'}")
        return journeys[journey_id]
    senders = [j for j in journeys if template in j.templates]
    return next((j for j in senders if j.id in enrolled), senders[0] if senders else None)


def _journeys(settings: Settings) -> JourneySet:
    """The journeys of CJM_JOURNEYS_DIR, or exit 1 with every error in them."""
    try:
        return load_journeys([settings.journeys_dir])
    except JourneyErrors as error:
        _fail(f"{error}\nthe journeys above are invalid")


def _sending_stage(journey: Journey | None, template: str) -> tuple[str, str]:
    if journey is None:
        return ("preview", "Preview")
    stage = next(
        (
            stage
            for stage in journey.stages
            if any(isinstance(a, EmailSend) and a.template == template for a in stage.on_enter)
        ),
        journey.first_stage,
    )
    return (stage.id, stage.title)


def _current_stage(journey: Journey, stage_id: str) -> tuple[str, str]:
    """The stage the lead is in; a stage the journey's file no longer has (the lead runs
    on an older version) keeps its id for a name, as the sender does."""
    stage = journey.stage_by_id.get(stage_id)
    return (stage_id, stage.title if stage is not None else stage_id)


@dataclass(frozen=True)
class _StoredLead:
    """A lead as the database holds it now, for a preview."""

    traits: dict[str, Any]
    # Journey id -> the stage of each run the lead is in now.
    stages: dict[str, str]


def _read_lead(database_url: str, lead_id: int) -> _StoredLead:
    """The lead `lead_id` is now (the survivor when it was merged into another), or say
    in plain words why it cannot be read and exit 1. Reads only: never migrates."""
    from sqlalchemy import select

    from engine.db.database import Database
    from engine.db.migrate import ensure_current
    from engine.db.queries import select_survivors
    from engine.db.schema import enrollments

    async def read() -> _StoredLead | None:
        await ensure_current(database_url)
        db = Database(database_url)
        try:
            async with db.read() as connection:
                row = (await select_survivors(connection, [lead_id])).get(lead_id)
                if row is None:
                    return None
                runs = await connection.execute(
                    select(enrollments.c.journey_id, enrollments.c.stage).where(
                        enrollments.c.lead_id == row.id, enrollments.c.state == "active"
                    )
                )
                stages = {run.journey_id: run.stage for run in runs}
        finally:
            await db.close()
        return _StoredLead(traits=dict(row.traits or {}), stages=stages)

    if not 1 <= lead_id <= MAX_LEAD_ID:
        _fail(f"no lead {lead_id}: lead ids are whole numbers from 1")
    where = _database_at(database_url)
    found = _on_database(where, f"read lead {lead_id} from", read)
    if found is None:
        _fail(f"no lead {lead_id} in the database at {where}")
    return found


def _database_at(database_url: str) -> str:
    """Where the database is, for messages (its password hidden); exit 1 when
    CJM_DATABASE_URL is not a URL, or names an SQLite file that is not there."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    try:
        url = make_url(database_url)
    except SQLAlchemyError as error:
        _fail(f"CJM_DATABASE_URL: {error}")
    where = url.render_as_string(hide_password=True)
    file = url.database or ""
    is_path = file not in ("", ":memory:") and not file.startswith("file:")
    # SQLite would create an empty file where there is none: say so instead.
    if url.get_backend_name() == "sqlite" and is_path and not Path(file).exists():
        _fail(f"no database at {where}: is CJM_DATABASE_URL right?")
    return where


def _on_database(where: str, doing: str, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run `work`, which opens the database at `where` (after `ensure_current`), or say
    in plain words why it failed and exit 1: "cannot {doing} the database at ..."."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return asyncio.run(work())
    except DatabaseNotMigrated as error:
        _fail(str(error))
    except (SQLAlchemyError, OSError, ValueError) as error:
        # The driver's own words, without SQLAlchemy's wrapping and links.
        reason = getattr(error, "orig", None) or error
        _fail(f"cannot {doing} the database at {where}: {reason}")


def _sample_offer(journey: Journey | None, name: str) -> OfferView:
    """The journey's offer as a lead would hold it now, with X for the random part."""
    if journey is None or name not in journey.offers:
        where = f"journey {journey.id!r}" if journey else "no journey sending this template"
        _fail(f"no offer {name!r} in {where}")
    offer = journey.offers[name]
    expires = offer.expires
    return OfferView(
        code=re.sub(r"\{(\d+)\}", lambda slot: "X" * int(slot.group(1)), offer.code),
        title=offer.title,
        expires_at=expires.at or datetime.now(UTC) + (expires.after or timedelta(0)),
    )


def _message(settings: Settings, lead: Mapping[str, Any], rendered: RenderedEmail) -> EmailMessage:
    """multipart/alternative, text then HTML: the order in which clients prefer the last."""
    message = EmailMessage()
    message["Subject"] = rendered.subject
    message["From"] = settings.email_from
    message["To"] = str(lead.get("email") or "")
    message.set_content(rendered.text)
    message.add_alternative(rendered.html, subtype="html")
    return message


@app.command("simulate")
def simulate_command(
    journey_id: Annotated[str, typer.Argument(metavar="JOURNEY", help="A journey id.")],
    events: Annotated[
        Path | None, typer.Option("--events", help="JSON Lines: one Segment message a line.")
    ] = None,
    leads: Annotated[
        int | None,
        typer.Option(
            "--leads",
            min=1,
            max=1_000_000,
            help="Add this many synthetic leads that behave as --profile says.",
        ),
    ] = None,
    profile: Annotated[
        Path | None,
        typer.Option(
            "--profile",
            help="YAML list of behaviours (weight, steps) for --leads; a built-in one if omitted.",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed of the traffic.")] = 1,
    start: Annotated[
        str,
        typer.Option("--start", help="ISO moment the synthetic leads start arriving (UTC)."),
    ] = "2026-01-05T09:00:00Z",
    spread: Annotated[
        str, typer.Option("--spread", help="Synthetic leads arrive uniformly over this, like 7d.")
    ] = "7d",
    paths: Annotated[
        bool, typer.Option("--paths", help="Print every lead's path even for more than 20 leads.")
    ] = False,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Also write the report as JSON.")
    ] = None,
) -> None:
    """Dry-run a journey on a virtual clock: no database, no emails, no network.

    With --leads above 20 (and no --paths) the leads' paths are not printed and the JSON
    report holds the totals and KPIs only."""
    from engine.ingest.messages import Message
    from engine.simulate import BadEvents, read_events, simulate
    from engine.traffic import BadTraffic, traffic

    if events is None and leads is None:
        _fail("give --events FILE, --leads N, or both")
    if leads is None and profile is not None:
        _fail("--profile is for synthetic traffic: give --leads N too")
    journeys = _journeys(_settings())
    if journey_id not in journeys:
        _fail(f"no journey {journey_id!r}; there are: {', '.join(journeys.ids) or 'none'}")
    messages: list[Message] = []
    if events is not None:
        try:
            messages = read_events(events)
        except BadEvents as error:
            _fail("\n".join(error.problems))
    synthetic = None  # made lead by lead while simulating
    if leads is not None:
        try:
            synthetic = traffic(leads, profile, seed=seed, start=start, spread=spread)
        except BadTraffic as error:
            _fail("\n".join(error.problems))
    detailed = paths or leads is None or leads <= 20
    # Without the details, each lead is counted into the KPIs and dropped at once.
    report = simulate(
        journeys[journey_id], messages, synthetic=synthetic or (), keep_leads=detailed
    )
    typer.echo(report.as_text(paths=detailed), nl=False)
    if output is not None:
        try:
            text = json.dumps(report.as_dict(leads=detailed), indent=2) + "\n"
            output.write_text(text, encoding="utf-8")
        except OSError as error:
            _fail(f"cannot write {output}: {error}")
        typer.echo(f"report written to {output}")


MAP_SUFFIXES = (".svg", ".html")


def _day(value: str | None) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a day: write YYYY-MM-DD") from None


@app.command("map")
def map_command(
    journey_ref: Annotated[
        str,
        typer.Argument(
            metavar="JOURNEY", help="A journey id (of CJM_JOURNEYS_DIR) or a journey file."
        ),
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="The file to write: map.svg or map.html.")
    ],
    kpis: Annotated[
        bool,
        typer.Option(
            "--kpis", help="Draw the figures and KPI colours from the database (CJM_DATABASE_URL)."
        ),
    ] = False,
    start: Annotated[
        date | None,
        typer.Option(
            "--from", parser=_day, metavar="YYYY-MM-DD", help="With --kpis: the first UTC day."
        ),
    ] = None,
    end: Annotated[
        date | None,
        typer.Option(
            "--to", parser=_day, metavar="YYYY-MM-DD", help="With --kpis: the last UTC day."
        ),
    ] = None,
) -> None:
    """Draw a journey as a customer journey map: a standalone SVG or HTML file.

    From the YAML alone, or with --kpis its figures for the leads that entered in the
    period: the same map the dashboard shows."""
    from engine.dashboard.map import lay_out, render_svg
    from engine.dashboard.pages import map_page

    if output.suffix.lower() not in MAP_SUFFIXES:
        raise typer.BadParameter(
            f"{output.name!r} is neither .svg nor .html: name the file like map.svg or map.html",
            param_hint="'--output'",
        )
    if not kpis and (start is not None or end is not None):
        raise typer.BadParameter("the period is of the figures: add --kpis", param_hint="'--from'")
    if start is not None and end is not None and start > end:
        raise typer.BadParameter(f"the period ends ({end}) before it starts", param_hint="'--to'")
    settings = _settings()
    journey = _map_journey(settings, journey_ref)
    report = _read_kpis(settings.database_url, journey, start, end) if kpis else None
    drawn = lay_out(journey, report)
    if output.suffix.lower() == ".svg":
        text = '<?xml version="1.0" encoding="UTF-8"?>\n' + render_svg(drawn) + "\n"
    else:
        text = map_page(drawn)
    try:
        with _whole_file(output) as stream:
            _writer(stream)(text)
    except _OutputFailed as error:
        _fail(f"cannot write {output}: {error}")
    figures = " with its figures" if kpis else ""
    typer.echo(f"map of {journey.id} v{journey.version}{figures} written to {output}")


def _map_journey(settings: Settings, reference: str) -> Journey:
    """The journey a file holds, when `reference` is a file; else the journey of that id in
    CJM_JOURNEYS_DIR. Exits 1 with every error of an invalid one."""
    path = Path(reference)
    if path.is_file() or path.suffix in (".yaml", ".yml"):
        try:
            return load_journey_file(path)
        except JourneyErrors as error:
            _fail(f"{error}\nthe journey above is invalid")
        except OSError as error:
            _fail(f"cannot read {path}: {error.strerror or error}")
    journeys = _journeys(settings)
    if reference not in journeys:
        _fail(f"no journey {reference!r}; there are: {', '.join(journeys.ids) or 'none'}")
    return journeys[reference]


def _read_kpis(
    database_url: str, journey: Journey, start: date | None, end: date | None
) -> dict[str, Any]:
    """The journey's KPI report as the API answers it, or say why not and exit 1."""
    from engine.db.database import Database
    from engine.db.migrate import ensure_current
    from engine.kpis.report import Period, read_kpis

    async def read() -> dict[str, Any]:
        await ensure_current(database_url)
        db = Database(database_url)
        try:
            report = await read_kpis(db, journey, Period(start, end))
        finally:
            await db.close()
        return report.model_dump(mode="json")

    where = _database_at(database_url)
    return _on_database(where, f"read the figures of {journey.id} from", read)


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


@audiences_app.command("export")
def audiences_export(
    name: Annotated[str, typer.Argument(help="An audience of the journeys, like visitors.")],
    format_: Annotated[
        Literal["meta", "google", "csv"],
        typer.Option(
            "--format",
            help="meta: JSON Lines of Meta Custom Audience pages (hashed); google: Google "
            "Customer Match CSV; csv: the clear list, with an op column.",
        ),
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="The file to write; - for standard output.")
    ],
    cursor: Annotated[
        str | None,
        typer.Option(
            help="The next cursor a previous export printed: only the adds and removes since."
        ),
    ] = None,
    op: Annotated[
        Literal["add", "remove"] | None,
        typer.Option(help="--format google: a file of the adds (default) or of the removes."),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=META_PAGE,
            help=f"--format meta: rows per page (default and most: {META_PAGE:,}).",
        ),
    ] = None,
) -> None:
    """Export an audience for an ad platform, in full or the changes since a cursor; print
    the cursor to sync on from next time."""
    settings = _settings()
    known = sorted({audience for journey in _journeys(settings) for audience in journey.audiences})
    if name not in known:
        _fail(
            f"no audience {name!r} in the journeys of {settings.journeys_dir}; "
            f"there are: {', '.join(known) or 'none'}"
        )
    try:
        # Empty, as the HTTP API takes it: from the beginning.
        start = Cursor.decode(cursor) if cursor else Cursor()
    except BadCursor as error:
        _fail(f"--cursor: {error}; pass the next cursor a previous export printed")
    if limit is not None and format_ != "meta":
        _fail("--limit is the page size of --format meta: the CSV formats are one whole file")
    if op is not None and format_ != "google":
        _fail(
            "--op is for --format google, a file of adds or of removes: "
            "meta pages and the clear CSV say each row's op"
        )
    where = _database_at(settings.database_url)
    to_stdout = str(output) == "-"
    shown = "standard output" if to_stdout else str(output)

    async def export(write: Callable[[str], None]) -> tuple[int, str]:
        from engine.db.database import Database
        from engine.db.migrate import ensure_current

        await ensure_current(settings.database_url)
        db = Database(settings.database_url)
        try:
            # What a running server numbers every 0.5 s: the latest changes are in too.
            while True:
                async with db.write() as connection:
                    if not await number_changes(connection):
                        break
            async with db.read() as connection:
                upto = start.upto if start.upto is not None else await last_number(connection)
                expected = await count_members(
                    connection, name, after=start.after, upto=upto, adds_only=start.full
                )
            # The range fixed now, so the bar's count and the rows written agree.
            fixed = Cursor(start.after, upto, start.full)
            with typer.progressbar(
                length=expected, label=f"exporting {name}", show_pos=True, file=sys.stderr
            ) as bar:
                if format_ == "meta":
                    done = await _meta_pages(
                        db, name, fixed, limit or META_PAGE, settings, write, bar.update
                    )
                else:
                    done = await _csv_file(
                        db, name, fixed, format_, op, settings, write, bar.update
                    )
                # A google file of one op leaves the other's rows out: still, all done.
                bar.update(max(expected - done[0], 0))
            return done
        finally:
            await db.close()

    target: AbstractContextManager[BinaryIO] = (
        nullcontext(typer.get_binary_stream("stdout")) if to_stdout else _whole_file(output)
    )
    try:
        with target as stream:
            rows, following = _on_database(
                where, f"export audience {name!r} from", lambda: export(_writer(stream))
            )
            if to_stdout:
                _flush(stream)
    except _OutputFailed as error:
        _fail(f"cannot write {shown}: {error}")
    typer.echo(f"wrote {rows} row{'' if rows == 1 else 's'} to {shown}", err=to_stdout)
    typer.echo(f"next cursor: {following}", err=to_stdout)


async def _meta_pages(
    db: Database,
    audience: str,
    cursor: Cursor,
    limit: int,
    settings: Settings,
    write: Callable[[str], None],
    advance: Callable[[int], None],
) -> tuple[int, str]:
    """Every page over the cursor's range, one JSON object a line (pages without rows left
    out: nothing to upload); the rows written and the cursor to sync on from."""
    rows = 0
    while True:
        page = await meta_page(db, audience, cursor, limit, settings.default_region)
        if page.rows:
            write(page.json().decode() + "\n")
            rows += len(page.rows)
            advance(len(page.rows))
        if not page.has_more:
            return rows, page.next_cursor
        cursor = Cursor.decode(page.next_cursor)


async def _csv_file(
    db: Database,
    audience: str,
    cursor: Cursor,
    format_: str,
    op: Literal["add", "remove"] | None,
    settings: Settings,
    write: Callable[[str], None],
    advance: Callable[[int], None],
) -> tuple[int, str]:
    """The whole CSV over the cursor's range; the rows written (not the header) and the
    cursor to sync on from."""
    google = format_ == "google"
    result = await csv_export(
        db,
        audience,
        cursor,
        google=google,
        ops=[op or "add"] if google else ["add", "remove"],
        region=settings.default_region,
    )
    rows = 0
    header = 1
    async for chunk in result.lines:
        write(chunk)
        # Records, not newlines: a quoted trait may hold a line break.
        written = sum(1 for _ in csv.reader(io.StringIO(chunk))) - header
        header = 0
        rows += written
        advance(written)
    return rows, result.next_cursor


class _OutputFailed(Exception):
    """The export's output could not be written (its reason, as the system says it)."""


def _writer(stream: BinaryIO) -> Callable[[str], None]:
    def write(text: str) -> None:
        try:
            stream.write(text.encode("utf-8"))
        except OSError as error:
            raise _OutputFailed(error.strerror or str(error)) from error

    return write


def _flush(stream: BinaryIO) -> None:
    try:
        stream.flush()
    except OSError as error:
        raise _OutputFailed(error.strerror or str(error)) from error


@contextmanager
def _whole_file(path: Path) -> Iterator[BinaryIO]:
    """A file that appears whole or not at all: written beside `path` under a hidden name,
    renamed over it once complete (half an audience uploaded would drop the other half
    from the ads). Exits 1 at once when it cannot be written."""
    if path.is_dir():
        _fail(f"cannot write {path}: it is a folder")
    if path.exists() and not os.access(path, os.W_OK):
        _fail(f"cannot write {path}: permission denied")
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    try:
        stream = partial.open("xb")  # the mode of any new file (umask), not 0600
    except OSError as error:
        _fail(f"cannot write {path}: {error.strerror or error}")
    try:
        yield stream
        try:
            stream.close()
            partial.replace(path)
        except OSError as error:
            raise _OutputFailed(error.strerror or str(error)) from error
    finally:
        stream.close()
        partial.unlink(missing_ok=True)


if __name__ == "__main__":
    main()

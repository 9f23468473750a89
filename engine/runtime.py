"""One cjm process, assembled: database, journeys, keys, the inbox and the worker.

`cjm serve` runs all of it beside the HTTP API, in one process; with
`--worker-process` its worker runs in a child process (`WorkerProcess`), so that
ingestion and the worker each have a core. `cjm worker` runs the worker without the
API. Everything shared between processes lives in the
database, so any number of them can run against one PostgreSQL (or one SQLite
file, whose writers take turns).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import logging
import os
import signal
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from sqlalchemy.engine import make_url

from channels.audiences.channel import AudienceChannel
from channels.email.channel import EmailChannel
from channels.email.links import Links
from channels.email.templates import check_templates
from channels.offers.store import redeem_coupons
from engine.clock import Clock, SystemClock
from engine.config import Settings
from engine.db.database import Database
from engine.db.migrate import ensure_current, upgrade
from engine.ingest.inbox import Inbox
from engine.journey import JourneyErrors, JourneySet, load_journeys
from engine.keys import ApiKeys
from engine.kpis.rollup import backfill_rollups
from engine.machine.book import JourneyBook
from engine.registry import publish
from engine.worker.loop import Worker
from engine.worker.processor import Processor

log = logging.getLogger("cjm")

# How soon a key rotated elsewhere stops working in this process.
KEY_REFRESH_S = 5.0


def load_checked_journeys(paths: list[Path], templates_dir: Path) -> JourneySet:
    """Journeys with their email templates rendered once for sample leads: nothing that
    would fail on a real lead is ever loaded. Raises JourneyErrors with every problem."""
    journeys = load_journeys(paths, templates_dir)
    errors = check_templates(templates_dir, {name for j in journeys for name in j.templates})
    if errors:
        raise JourneyErrors(errors)
    return journeys


def tune_garbage_collector() -> None:
    """Tune CPython's collector for a long-running engine process, once it has started.

    Every event makes thousands of small short-lived objects (rows, core values), and
    with the default thresholds the collector keeps re-examining everything start-up
    loaded (journeys, templates, modules): about a tenth of the worker's time. What
    start-up made is frozen out of its sight, and young objects are collected less
    often: the worker goes about 10% faster.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def _database(url: str, *, take_turns: bool) -> Database:
    """The database; with `take_turns`, an SQLite file's writers in this process and
    the others that ask for it take turns (below)."""
    file = make_url(url).database or ""
    is_file = file not in ("", ":memory:") and not file.startswith("file:")
    if take_turns and make_url(url).get_backend_name() == "sqlite" and is_file:
        return TurnTakingDatabase(url, Path(f"{file}.writers"))
    return Database(url)


class TurnTakingDatabase(Database):
    """An SQLite database whose writers, in this and other processes, take turns.

    SQLite lets a writer that finds the file locked sleep and retry, in naps of up to
    100 ms. `cjm serve`'s inbox and its worker process write the same file: the worker,
    with a backlog, starts its next transaction a moment after committing the last, and
    the inbox, asleep in a nap, keeps missing the gap; accepted events wait behind
    whole worker batches. Here every write transaction first takes an exclusive lock on
    a file beside the database (flock), which the system hands to a waiter the moment
    it is released: the processes alternate. SQLite's own lock still guarantees the
    one writer; this only orders them.

    A writer waiting for the turn also holds a shared lock on a second file (the lock
    file's name and `-waiting`), so that the holder can tell that another process
    waits for it (`others_wait`): the worker process then keeps its batches as short
    as it does for the inbox of its own process. Without it, the worker sized its
    batches for a database to itself, and tracking calls waited behind batches of a
    tenth of a second whenever it had a backlog.
    """

    def __init__(self, url: str, lock_path: Path) -> None:
        super().__init__(url)
        self._lock_file = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        waiting_path = lock_path.with_name(f"{lock_path.name}-waiting")
        self._waiting_file = os.open(waiting_path, os.O_RDWR | os.O_CREAT, 0o600)
        self._local_turn = asyncio.Lock()  # one flock holder per process at a time

    def others_wait(self) -> bool:
        return super().others_wait() or self._waited_for_elsewhere()

    def _waited_for_elsewhere(self) -> bool:
        """Whether a writer of another process holds the shared lock of its wait."""
        try:
            fcntl.flock(self._waiting_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self._waiting_file, fcntl.LOCK_UN)
        return False

    @contextlib.asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        async with self._local_turn:
            await self._lock()
            try:
                yield
            finally:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    async def _lock(self) -> None:
        try:  # a free turn is taken here, without a trip to a thread
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        taking = asyncio.ensure_future(asyncio.to_thread(self._wait_for_turn))
        try:
            await asyncio.shield(taking)
        except asyncio.CancelledError:
            # The thread takes the lock all the same: give it back once it has.
            taking.add_done_callback(self._unlock_taken)
            raise

    def _wait_for_turn(self) -> None:
        """In a thread: take the turn, shown meanwhile as waiting for it. The shared lock
        waits only for a holder's look (`_waited_for_elsewhere`), a moment."""
        fcntl.flock(self._waiting_file, fcntl.LOCK_SH)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX)
        finally:
            fcntl.flock(self._waiting_file, fcntl.LOCK_UN)

    def _unlock_taken(self, taking: asyncio.Future[None]) -> None:
        if not taking.cancelled() and taking.exception() is None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    async def close(self) -> None:
        await super().close()
        if self._lock_file >= 0:
            os.close(self._lock_file)
            os.close(self._waiting_file)
            self._lock_file = self._waiting_file = -1


class Runtime:
    """Started by `start()`, which refuses to go on with an invalid journey or an
    unmigrated PostgreSQL database; SQLite, the embedded default, migrates itself."""

    db: Database
    book: JourneyBook
    keys: ApiKeys
    inbox: Inbox
    worker: Worker
    links: Links
    email: EmailChannel
    # Keys generated by this start, to be shown once.
    generated_keys: dict[str, str]

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        journeys: JourneySet | None = None,
        run_worker: bool = True,
        worker_process: WorkerProcess | None = None,
        writers_take_turns: bool = False,
    ) -> None:
        """`run_worker`: process events, timers, emails and audiences in this process;
        `worker_process`: have a child process do it instead (started last, once this
        process has migrated, published the journeys and stored the keys);
        `writers_take_turns`: on an SQLite file, order this process's write transactions
        with those of the other processes that do (see TurnTakingDatabase)."""
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self.run_worker = run_worker
        self.worker_process = worker_process
        self.writers_take_turns = writers_take_turns
        self._journeys = journeys
        self._started = False
        self._key_refresh: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._started:
            return
        settings = self.settings
        journeys = self._journeys or load_checked_journeys(
            [settings.journeys_dir], settings.templates_dir
        )
        if settings.database_url.startswith("sqlite"):
            await upgrade(settings.database_url)
        else:
            await ensure_current(settings.database_url)
        self.db = _database(settings.database_url, take_turns=self.writers_take_turns)
        try:
            self.book = await publish(self.db, journeys, self.clock.now())
            await backfill_rollups(self.db)
            self.keys, self.generated_keys = await ApiKeys.load(self.db, settings)
            self.links = await Links.load(self.db, settings.base_url, self.clock.now())
            self.email = EmailChannel(
                settings=settings, db=self.db, clock=self.clock, book=self.book, links=self.links
            )
            self.audiences = AudienceChannel(
                db=self.db, clock=self.clock, book=self.book, region=settings.default_region
            )
        except BaseException:
            await self.db.close()
            raise
        self.worker = Worker(
            Processor(self.db, self.book, self.clock, event_hooks=[redeem_coupons])
        )
        on_commit: Callable[[], None] | None = None
        if self.run_worker:
            on_commit = self.worker.wake
        elif self.worker_process is not None:
            on_commit = self.worker_process.wake
        self.inbox = Inbox(self.db, self.clock, on_commit=on_commit)
        await self.inbox.start()
        if self.run_worker:
            await self.worker.start()
            await self.email.start()
            await self.audiences.start()
        self._key_refresh = asyncio.create_task(self._refresh_keys(), name="cjm-keys")
        self._started = True
        if self.worker_process is not None:
            try:
                await self.worker_process.start()
            except BaseException:
                await self.stop()
                raise

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        if self._key_refresh is not None:
            self._key_refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._key_refresh
        await self.inbox.stop()
        if self.worker_process is not None:
            await self.worker_process.stop()
        await self.worker.stop()
        await self.email.stop()
        await self.audiences.stop()
        await self.db.close()

    async def _refresh_keys(self) -> None:
        while True:
            await asyncio.sleep(KEY_REFRESH_S)
            try:
                await self.keys.refresh(self.db)
            except Exception:
                log.exception("reading the stored keys failed; keeping the ones in use")


# A worker process that exits on its own is started again after RESTART_DELAYS_S[n] for
# its n-th exit within RESTART_WINDOW_S; one more exit in that window and `cjm serve`
# stops with an error.
RESTART_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)
RESTART_WINDOW_S = 120.0
# How long a stopping worker process may take to finish its batch before it is killed.
WORKER_STOP_S = 20.0


class WorkerNotStarted(RuntimeError):
    """The worker process exited before it was ready (its errors are in the output)."""


class WorkerProcess:
    """`cjm worker` as a child process of `cjm serve`, stopped with it.

    The child is given the read end of a pipe whose write end only this process holds.
    A byte on it means "the inbox committed something, look now" (the wake-up the worker
    gets in-process); end of file means this process is gone, however it ended, even by
    SIGKILL, and the child stops on its own: it never outlives its server. The child has
    a session of its own, so a terminal's Ctrl-C reaches this process alone, which stops
    the HTTP server first and the child after. Its output is this process's output.

    A child that exits on its own (a crash, the out-of-memory killer) is restarted: the
    events it had not processed wait in the database, and the API goes on accepting. A
    child that keeps exiting is a broken deployment, not a passing fault: `on_give_up` is
    called, and `cjm serve` stops with an error rather than accept events no worker will
    ever process.
    """

    def __init__(self, *, on_give_up: Callable[[], None]) -> None:
        self._on_give_up = on_give_up
        self._process: asyncio.subprocess.Process | None = None
        self._pipe: int | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        """Start the child and return once it is ready: a server that answers has a
        worker processing what it accepts. Raises WorkerNotStarted."""
        if self._supervisor is None:
            self._stopping = False
            if not await self._spawn():
                assert self._process is not None
                code = await self._process.wait()
                self._close_pipe()
                raise WorkerNotStarted(f"the worker process {_ended(code)} while starting")
            self._supervisor = asyncio.create_task(self._supervise(), name="cjm-worker-process")

    def wake(self) -> None:
        """Tell the child the inbox committed something: it looks now, not at its next poll."""
        if self._pipe is None:
            return
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            # A full pipe already holds wake-ups the child has not read; a broken one
            # belongs to a child that exited, which the supervisor restarts.
            os.write(self._pipe, b"\x01")

    async def stop(self) -> None:
        """Ask the child to stop (SIGTERM), kill it if it has not within WORKER_STOP_S."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), WORKER_STOP_S)
            except TimeoutError:
                log.error("the worker process did not stop within %.0f s: killed", WORKER_STOP_S)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        self._close_pipe()

    async def _spawn(self) -> bool:
        """Start a child; whether it got ready (False: it exited while starting)."""
        self._close_pipe()
        # Neither end of either pipe is inherited by other children (PEP 446).
        wake_read, wake_write = os.pipe()
        ready_read, ready_write = os.pipe()
        os.set_blocking(wake_write, False)
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "engine.cli",
                "worker",
                "--parent-pipe",
                str(wake_read),
                "--ready-pipe",
                str(ready_write),
                pass_fds=(wake_read, ready_write),
                start_new_session=True,
            )
        except BaseException:
            os.close(wake_write)
            os.close(ready_read)
            raise
        finally:
            os.close(wake_read)
            os.close(ready_write)
        self._pipe = wake_write
        # A byte once it has started; end of file if it exits before.
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[bytes] = loop.create_future()

        def read_answer() -> None:
            if not answer.done():
                answer.set_result(os.read(ready_read, 1))

        loop.add_reader(ready_read, read_answer)
        try:
            ready = await answer
        finally:
            loop.remove_reader(ready_read)
            os.close(ready_read)
        if ready:
            log.info("worker process %d started", self._process.pid)
        return bool(ready)

    async def _supervise(self) -> None:
        exits: deque[float] = deque()
        loop = asyncio.get_running_loop()
        while True:
            assert self._process is not None
            code = await self._process.wait()
            if self._stopping:
                return
            now = loop.time()
            exits.append(now)
            while exits and exits[0] < now - RESTART_WINDOW_S:
                exits.popleft()
            if len(exits) > len(RESTART_DELAYS_S):
                log.critical(
                    "the worker process %s %d times in %.0f s: cjm serve stops; see the "
                    "errors above",
                    _ended(code),
                    len(exits),
                    RESTART_WINDOW_S,
                )
                self._close_pipe()
                self._on_give_up()
                return
            delay = RESTART_DELAYS_S[len(exits) - 1]
            log.error("the worker process %s: starting another in %.1f s", _ended(code), delay)
            await asyncio.sleep(delay)
            if self._stopping:
                return
            await self._spawn()  # one that exits while starting is counted at the next turn

    def _close_pipe(self) -> None:
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None


def _ended(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"

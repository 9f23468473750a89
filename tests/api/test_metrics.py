"""`/metrics` scraped over HTTP while a running engine works, over each database.

The counters belong to the process and are shared by every test in it, so each test
compares a scrape before with one after its own work."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.runtime import Runtime
from tests.email.conftest import Mail
from tests.email.conftest import mail as mail
from tests.email.conftest import smtp as smtp
from tests.worker.conftest import Engine, app_client
from tests.worker.conftest import engine as engine

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
CATALOG = {"path": "/catalog/doors"}


async def scrape(runtime: Runtime) -> Samples:
    async with app_client(runtime) as client:
        answer = await client.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
async def client(engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(engine.runtime, auth=("wk_test", "")) as client:
        yield client


async def test_ingestion_transitions_timers_and_queues_are_measured(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    before = await scrape(engine.runtime)

    for user_id in ("u1", "u2"):
        answer = await client.post("/v1/page", json={"userId": user_id, "properties": CATALOG})
        assert answer.status_code == 200
    queued = await scrape(engine.runtime)
    await engine.run(timedelta(hours=2, seconds=5))  # enter, then the 2 h timeouts are 5 s late
    await engine.run()
    after = await scrape(engine.runtime)

    ingested = "cjm_events_ingested_total"
    assert value(queued, ingested, type="page") - value(before, ingested, type="page") == 2
    assert value(queued, "cjm_queue_depth", queue="events_pending") == 2
    assert value(after, "cjm_queue_depth", queue="events_pending") == 0
    moved = value(after, "cjm_transitions_total", journey="funnel") - value(
        before, "cjm_transitions_total", journey="funnel"
    )
    assert moved == 4  # two entries, two timeouts to `retarget`
    fired = value(after, "cjm_timers_fired_total") - value(before, "cjm_timers_fired_total")
    assert fired == 2
    lag = value(after, "cjm_timer_lag_seconds_sum") - value(before, "cjm_timer_lag_seconds_sum")
    assert lag == pytest.approx(10.0)
    late = "cjm_timer_lag_seconds_bucket"
    assert value(after, late, le="2.5") - value(before, late, le="2.5") == 0
    assert value(after, late, le="10.0") - value(before, late, le="10.0") == 2


async def test_email_outcomes_are_counted_by_status(mail: Mail) -> None:
    before = await scrape(mail.runtime)

    await mail.sign_up("reader", email="reader@example.com")
    await mail.sign_up("nobody")  # no address: skipped
    await mail.deliver()
    after = await scrape(mail.runtime)

    for status in ("sent", "skipped"):
        grew = value(after, "cjm_emails_total", status=status) - value(
            before, "cjm_emails_total", status=status
        )
        assert grew == 1, status

"""`GET /v1/journeys/{id}/kpis` on a running engine, over each database: the figures of
known traffic, repeat purchases, re-entry, merges, late events, periods; and the
incremental roll-ups always equal to a rebuild from the history."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from engine.db.schema import kpi_cohorts, kpi_leads, kpi_moves, kpi_stage_times
from engine.kpis.rollup import rebuild
from tests.worker.conftest import START, Engine, app_client, running_engine, write_funnel

ADMIN = {"Authorization": "Bearer ak_test"}
CATALOG = {"path": "/catalog/doors"}
LANDING = {"path": "/landing/doors"}
REVENUE_100 = {"revenue": 100}
REVENUE_50 = {"revenue": 50}


def source(name: str) -> dict[str, Any]:
    return {"campaign": {"source": name}}


@pytest.fixture
async def engine(database_url: str, tmp_path: Path) -> AsyncIterator[Engine]:
    async with running_engine(database_url, write_funnel(tmp_path)) as engine:
        yield engine


async def kpis(engine: Engine, **period: str) -> dict[str, Any]:
    params = {key.rstrip("_"): value for key, value in period.items()}
    async with app_client(engine.runtime, headers=ADMIN) as client:
        answer = await client.get("/v1/journeys/funnel/kpis", params=params)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def stage(body: dict[str, Any], stage_id: str) -> dict[str, Any]:
    (found,) = [entry for entry in body["stages"] if entry["stage"] == stage_id]
    return found


async def snapshot(engine: Engine) -> dict[str, Any]:
    """Every roll-up, summed over shards, with zero rows left out."""
    found: dict[str, Any] = {}
    async with engine.runtime.db.read() as connection:
        found["leads"] = sorted(tuple(row) for row in await connection.execute(select(kpi_leads)))
        for table, keys, counts in (
            (kpi_cohorts, ("day", "source"), ("leads", "customers", "goals", "value")),
            (kpi_moves, ("day", "from_stage", "to_stage"), ("leads",)),
            (kpi_stage_times, ("day", "stage", "bucket"), ("leads", "seconds")),
        ):
            query = select(
                table.c.journey_id,
                *(table.c[key] for key in keys),
                *(func.sum(table.c[count]) for count in counts),
            ).group_by(table.c.journey_id, *(table.c[key] for key in keys))
            rows = {
                tuple(row[: len(keys) + 1]): tuple(round(float(v), 6) for v in row[len(keys) + 1 :])
                for row in await connection.execute(query)
            }
            found[table.name] = {key: value for key, value in rows.items() if any(value)}
    return found


async def assert_equal_to_a_rebuild(engine: Engine) -> None:
    incremental = await snapshot(engine)
    async with engine.runtime.db.write() as connection:
        await rebuild(connection)
    assert await snapshot(engine) == incremental


async def test_figures_of_known_traffic(engine: Engine) -> None:
    # a: from google, lands, buys twice (a repeat purchase). b: from facebook, never comes
    # back, retargeted then lost. c: no source, opts out after ten minutes.
    await engine.send("page", anonymousId="a", properties=CATALOG, context=source("google"))
    await engine.send("page", anonymousId="b", properties=CATALOG, context=source("facebook"))
    await engine.send("page", anonymousId="c", properties=CATALOG)
    await engine.run()
    await engine.run(timedelta(minutes=10))
    await engine.send("track", anonymousId="c", event="opted_out")
    await engine.run(timedelta(minutes=20))
    await engine.send("page", anonymousId="a", properties=LANDING)
    await engine.run(timedelta(minutes=30))
    await engine.send("track", anonymousId="a", event="order_completed", properties=REVENUE_100)
    await engine.run(timedelta(hours=1))
    await engine.send("track", anonymousId="a", event="order_completed", properties=REVENUE_50)
    await engine.run(timedelta(days=15))

    body = await kpis(engine)

    assert body["totals"] == {
        "leads": 3,
        "customers": 1,
        "goals": 2,
        "conversion": pytest.approx(1 / 3),
        "average_value": 75.0,
        "purchases_per_customer": 2.0,
        "revenue": 150.0,
    }
    assert list(body["by_source"]) == ["(none)", "facebook", "google"]  # by leads, then name
    assert body["by_source"]["google"]["customers"] == 1
    assert body["by_source"]["google"]["revenue"] == 150.0
    assert body["by_source"]["facebook"]["leads"] == 1
    assert body["by_source"]["facebook"]["customers"] == 0

    visitor = stage(body, "visitor")
    assert (visitor["entered"], visitor["current"]) == (3, 0)
    assert visitor["exited_to"] == {"exit": 1, "interested": 1, "retarget": 1}
    assert visitor["conversion"] == pytest.approx(2 / 3)
    # In the stage for 10 minutes (c), 30 (a), and the 2 h timeout (b).
    assert visitor["median_time_s"] == 1800.0
    assert visitor["p90_time_s"] == 7200.0
    retarget = stage(body, "retarget")
    assert (retarget["entered"], retarget["exited_to"]) == (1, {"lost": 1})
    assert retarget["median_time_s"] == 14 * 86_400.0
    assert retarget["conversion"] == 0.0
    assert (stage(body, "lost")["entered"], stage(body, "lost")["current"]) == (1, 1)
    assert stage(body, "interested")["exited_to"] == {"customer": 1}
    assert stage(body, "customer")["current"] == 1
    await assert_equal_to_a_rebuild(engine)


async def test_re_entry_is_the_same_lead_entering_again(engine: Engine) -> None:
    for _ in range(3):  # the funnel lets a lead back in after it left
        await engine.send("page", userId="u", properties=CATALOG)
        await engine.run(timedelta(minutes=5))
        await engine.send("track", userId="u", event="opted_out")
        await engine.run(timedelta(minutes=5))

    body = await kpis(engine)

    assert body["totals"]["leads"] == 1
    visitor = stage(body, "visitor")
    assert (visitor["entered"], visitor["exited_to"]) == (3, {"exit": 3})
    assert visitor["median_time_s"] == 300.0
    await assert_equal_to_a_rebuild(engine)


async def test_a_merged_person_is_one_lead(engine: Engine) -> None:
    # The same person on a phone (anonymous, from tiktok) and logged in on a laptop:
    # both enter; then an identify shows they are one. One lead, one run, one cohort.
    await engine.send("page", anonymousId="phone", properties=CATALOG, context=source("tiktok"))
    await engine.run(timedelta(minutes=1))
    await engine.send("page", userId="ann", properties=CATALOG, context=source("google"))
    await engine.run(timedelta(minutes=1))
    await engine.send("track", userId="ann", event="order_completed", properties={"revenue": 30})
    await engine.run(timedelta(minutes=1))
    before = await kpis(engine)
    assert before["totals"]["leads"] == 2

    await engine.send("identify", userId="ann", anonymousId="phone")
    await engine.run(timedelta(minutes=1))
    await engine.send("track", userId="ann", event="order_completed", properties={"revenue": 20})
    await engine.run(timedelta(minutes=1))

    body = await kpis(engine)
    assert body["totals"]["leads"] == 1
    assert body["totals"]["customers"] == 1
    assert body["totals"]["goals"] == 2  # each purchase, whichever device made it
    assert body["totals"]["revenue"] == 50.0
    assert list(body["by_source"]) == ["tiktok"]  # the first touch of the person
    visitor = stage(body, "visitor")
    # The laptop's run duplicated the phone's and ended in the merge: not counted.
    assert (visitor["entered"], visitor["current"], visitor["exited_to"]) == (1, 1, {})
    await assert_equal_to_a_rebuild(engine)


async def test_late_events_count_where_they_belong(engine: Engine) -> None:
    await engine.send("page", userId="u", properties=CATALOG)
    await engine.run(timedelta(hours=1))
    await engine.send("page", userId="u", properties=LANDING)
    await engine.run(timedelta(hours=1))
    # Arriving now, but from before the lead's other events: a purchase made offline
    # and the first visit's ad click, sent late by a server.
    early = (START - timedelta(minutes=5)).isoformat()
    await engine.send(
        "track",
        userId="u",
        event="order_completed",
        properties={"revenue": 80},
        timestamp=early,
        messageId="late-order",
    )
    await engine.send(
        "track", userId="u", event="ad_clicked", context=source("bing"), timestamp=early
    )
    await engine.run()

    body = await kpis(engine)
    assert body["totals"]["goals"] == 1
    assert body["totals"]["revenue"] == 80.0
    assert list(body["by_source"]) == ["bing"]
    assert stage(body, "interested")["exited_to"] == {"customer": 1}
    await assert_equal_to_a_rebuild(engine)


async def test_a_late_first_touch_alone_moves_the_lead_to_its_source(engine: Engine) -> None:
    await engine.send("page", userId="u", properties=CATALOG, context=source("google"))
    await engine.run(timedelta(hours=1))
    early = (START - timedelta(minutes=5)).isoformat()
    # A batch with nothing else: no move, no goal; only an earlier ad click, late.
    await engine.send(
        "track", userId="u", event="ad_clicked", context=source("bing"), timestamp=early
    )
    await engine.run()

    assert list((await kpis(engine))["by_source"]) == ["bing"]
    await assert_equal_to_a_rebuild(engine)


async def test_the_period_selects_leads_by_the_day_they_first_entered(engine: Engine) -> None:
    await engine.send("page", userId="early", properties=CATALOG)
    await engine.run(timedelta(days=3))  # after its 2 h timeout: in retarget
    await engine.send("page", userId="later", properties=CATALOG)
    await engine.send("page", userId="early", properties=LANDING)
    await engine.run()
    first_day = START.date().isoformat()
    fourth_day = (START + timedelta(days=3)).date().isoformat()

    early = await kpis(engine, from_=first_day, to=first_day)
    later = await kpis(engine, from_=fourth_day)
    both = await kpis(engine, to=fourth_day)

    assert early["totals"]["leads"] == 1
    # Its move on the fourth day still counts with the lead's cohort.
    assert stage(early, "retarget")["exited_to"] == {"interested": 1}
    assert later["totals"]["leads"] == 1
    assert stage(later, "visitor")["entered"] == 1
    assert stage(later, "retarget")["exited_to"] == {}
    assert both["totals"]["leads"] == 2
    assert (early["from"], early["to"], later["to"]) == (first_day, first_day, None)
    # A time is taken as its UTC day.
    assert (await kpis(engine, from_=START.isoformat()))["from"] == first_day


async def test_bad_periods_and_unknown_journeys_are_refused(engine: Engine) -> None:
    async with app_client(engine.runtime, headers=ADMIN) as client:
        bad = await client.get("/v1/journeys/funnel/kpis", params={"from": "yesterday"})
        reversed_ = await client.get(
            "/v1/journeys/funnel/kpis", params={"from": "2026-11-05", "to": "2026-11-01"}
        )
        unknown = await client.get("/v1/journeys/nope/kpis")
    async with app_client(engine.runtime) as client:
        anonymous = await client.get("/v1/journeys/funnel/kpis")
    assert bad.status_code == 400
    assert "from" in bad.json()["detail"]
    assert reversed_.status_code == 400
    assert unknown.status_code == 404
    assert anonymous.status_code == 401


async def test_erasure_counts_the_run_as_left(engine: Engine) -> None:
    await engine.send("page", userId="gone", properties=CATALOG)
    await engine.run(timedelta(minutes=3))
    lead_id = await engine.lead_id(user_id="gone")
    async with app_client(engine.runtime, headers=ADMIN) as client:
        assert (await client.delete(f"/v1/leads/{lead_id}")).status_code == 200

    body = await kpis(engine)
    assert body["totals"]["leads"] == 1  # the figures stay; the person's data does not
    assert stage(body, "visitor")["exited_to"] == {"exit": 1}
    assert stage(body, "visitor")["current"] == 0
    await assert_equal_to_a_rebuild(engine)


async def test_a_database_from_before_the_roll_ups_is_counted_on_start(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    await engine.send("page", userId="u", properties=CATALOG, context=source("google"))
    await engine.run()
    expected = await snapshot(engine)
    async with engine.runtime.db.write() as connection:
        for table in (kpi_leads, kpi_cohorts, kpi_moves, kpi_stage_times):
            await connection.execute(table.delete())
    await engine.runtime.stop()

    async with running_engine(database_url, write_funnel(tmp_path)) as restarted:
        assert await snapshot(restarted) == expected
        assert (await kpis(restarted))["by_source"]["google"]["leads"] == 1


async def test_many_leads_and_merges_match_a_rebuild(engine: Engine) -> None:
    # Mixed traffic in several batches: entries, moves, timeouts, goals, re-entries,
    # merges between leads in every state, and late events.
    for n in range(40):
        ids = {"anonymousId": f"a{n}"} if n % 3 else {"userId": f"u{n}"}
        await engine.send("page", **ids, properties=CATALOG, context=source(f"s{n % 4}"))
        if n % 4 == 1:
            await engine.send("page", **ids, properties=LANDING)
        if n % 5 == 2:
            await engine.send("track", **ids, event="order_completed", properties={"revenue": n})
        if n % 7 == 3:
            await engine.send("track", **ids, event="opted_out")
        await engine.run(timedelta(minutes=37))
    for n in range(1, 40, 3):  # anonymous a{n} turns out to be u{n - 1}
        await engine.send("identify", userId=f"u{n - 1}", anonymousId=f"a{n}")
        if n % 2:
            await engine.send("page", userId=f"u{n - 1}", properties=LANDING)
        await engine.run(timedelta(hours=3))
    await engine.run(timedelta(days=20))

    body = await kpis(engine)
    assert body["totals"]["leads"] < 40  # merged people counted once
    await assert_equal_to_a_rebuild(engine)


async def test_kpis_answer_without_traffic(engine: Engine) -> None:
    body = await kpis(engine)
    assert body["totals"]["leads"] == 0
    assert body["by_source"] == {}
    assert [entry["stage"] for entry in body["stages"]] == [
        "visitor",
        "retarget",
        "interested",
        "customer",
        "lost",
    ]
    assert all(entry["status"] == "none" for entry in body["stages"])

"""The lead admin API: finding leads and reading everything the journeys did to one."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import insert

from engine.db.database import Database
from engine.db.schema import (
    audience_members,
    emails,
    enrollments,
    events,
    goals,
    identities,
    leads,
    outbox,
    timers,
    transitions,
)
from tests.api.conftest import ADMIN, NOW, Runtime

T0 = NOW - timedelta(days=2)


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


async def add_lead(
    db: Database,
    *,
    created_at: datetime = T0,
    email: str | None = None,
    merged_into: int | None = None,
    ids: tuple[tuple[str, str], ...] = (),
) -> int:
    async with db.write() as connection:
        lead_id: int = (
            await connection.execute(
                insert(leads).returning(leads.c.id),
                {
                    "created_at": created_at,
                    "updated_at": created_at,
                    "traits": {"email": email} if email else {},
                    "email": email,
                    "merged_into": merged_into,
                },
            )
        ).scalar_one()
        for offset, (kind, value) in enumerate(ids):
            await connection.execute(
                insert(identities),
                {
                    "kind": kind,
                    "value": value,
                    "lead_id": lead_id,
                    "created_at": created_at + timedelta(seconds=offset),
                },
            )
    return lead_id


async def add_journey_rows(db: Database, lead_id: int) -> None:
    """One finished run and one active run of `doors`, with all that hangs off them."""
    async with db.write() as connection:

        async def run(**row: Any) -> int:
            result = await connection.execute(
                insert(enrollments).returning(enrollments.c.id),
                {"lead_id": lead_id, "journey_id": "doors", "version": 1, "sequences": [], **row},
            )
            return int(result.scalar_one())

        first = await run(
            entry_no=1,
            stage="lost",
            state="exited",
            epoch=2,
            entered_at=T0,
            stage_entered_at=T0 + timedelta(hours=2),
            ended_at=T0 + timedelta(hours=2),
        )
        second = await run(
            entry_no=2,
            stage="first_contact",
            state="active",
            epoch=1,
            entered_at=NOW - timedelta(hours=1),
            stage_entered_at=NOW - timedelta(hours=1),
            ended_at=None,
        )
        await connection.execute(
            insert(transitions),
            [
                {
                    "enrollment_id": first,
                    "journey_id": "doors",
                    "from_stage": None,
                    "to_stage": "first_contact",
                    "at": T0,
                    "cause": {"kind": "entry", "message_id": "m1"},
                },
                {
                    "enrollment_id": first,
                    "journey_id": "doors",
                    "from_stage": "first_contact",
                    "to_stage": "lost",
                    "at": T0 + timedelta(hours=2),
                    "cause": {"kind": "timeout"},
                },
                {
                    "enrollment_id": second,
                    "journey_id": "doors",
                    "from_stage": None,
                    "to_stage": "first_contact",
                    "at": NOW - timedelta(hours=1),
                    "cause": {"kind": "entry"},
                },
            ],
        )
        await connection.execute(
            insert(timers),
            {
                "due_at": NOW + timedelta(hours=1),
                "lead_id": lead_id,
                "enrollment_id": second,
                "stage": "first_contact",
                "epoch": 1,
                "transition": 1,
            },
        )
        queued = [
            ("email.send", "order_thanks", "dispatched"),
            ("offer.grant", "free_install", "pending"),
            ("sequence.start", "door_tips", "pending"),
            ("audience.add", "site_visitors", "done"),
        ]
        await connection.execute(
            insert(outbox),
            [
                {
                    "idempotency_key": f"k{n}",
                    "lead_id": lead_id,
                    "enrollment_id": second,
                    "journey_id": "doors",
                    "action": action,
                    "target": target,
                    "status": status,
                    "created_at": NOW - timedelta(minutes=30 - n),
                    "updated_at": NOW,
                }
                for n, (action, target, status) in enumerate(queued)
            ],
        )
        await connection.execute(
            insert(emails),
            {
                "idempotency_key": "k0",
                "lead_id": lead_id,
                "enrollment_id": second,
                "journey_id": "doors",
                "stage": "first_contact",
                "template": "order_thanks",
                "status": "sent",
                "due_at": NOW - timedelta(minutes=30),
                "attempts": 1,
                "message_id": "<1@cjm.test>",
                "created_at": NOW - timedelta(minutes=30),
                "updated_at": NOW - timedelta(minutes=29),
                "sent_at": NOW - timedelta(minutes=29),
            },
        )
        await connection.execute(
            insert(audience_members),
            {
                "audience": "site_visitors",
                "lead_id": lead_id,
                "journey_id": "doors",
                "added_at": T0,
                "removed_at": None,
            },
        )
        await connection.execute(
            insert(goals),
            {
                "enrollment_id": second,
                "journey_id": "doors",
                "message_id": "m9",
                "at": NOW - timedelta(minutes=5),
                "value": 1200.0,
            },
        )
        await connection.execute(
            insert(events),
            [
                {
                    "message_id": f"m{n}",
                    "lead_id": lead_id,
                    "type": "track",
                    "name": "order_completed",
                    "timestamp": T0 + timedelta(hours=n),
                    "received_at": T0 + timedelta(hours=n),
                    "data": {},
                    "processed_at": T0 + timedelta(hours=n) if n < 2 else None,
                    "error": None,
                }
                for n in range(3)
            ],
        )


async def get(client: httpx.AsyncClient, path: str, **params: Any) -> httpx.Response:
    return await client.get(path, params=params, headers=ADMIN)


async def test_a_lead_shows_its_ids_journeys_history_timers_and_channels(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    lead_id = await add_lead(
        runtime.db, email="ann@x.test", ids=(("anon", "a1"), ("user", "u1"), ("anon", "a2"))
    )
    await add_journey_rows(runtime.db, lead_id)

    response = await get(client, f"/v1/leads/{lead_id}")

    assert response.status_code == 200
    lead = response.json()
    assert {key: lead[key] for key in ("id", "user_id", "user_ids", "anonymous_ids")} == {
        "id": lead_id,
        "user_id": "u1",
        "user_ids": ["u1"],
        "anonymous_ids": ["a1", "a2"],
    }
    assert (lead["traits"], lead["created_at"], lead["merged_ids"]) == (
        {"email": "ann@x.test"},
        iso(T0),
        [],
    )
    active, finished = lead["journeys"]
    assert active == {
        "journey": "doors",
        "version": 1,
        "entry": 2,
        "stage": "first_contact",
        "state": "active",
        "entered_at": iso(NOW - timedelta(hours=1)),
        "stage_entered_at": iso(NOW - timedelta(hours=1)),
        "ended_at": None,
        "timers": [
            {"due_at": iso(NOW + timedelta(hours=1)), "stage": "first_contact", "to": "lost"}
        ],
        "history": [
            {
                "from": None,
                "to": "first_contact",
                "at": iso(NOW - timedelta(hours=1)),
                "cause": {"kind": "entry"},
            }
        ],
    }
    assert (finished["entry"], finished["state"], finished["timers"]) == (1, "exited", [])
    assert [(step["from"], step["to"]) for step in finished["history"]] == [
        (None, "first_contact"),
        ("first_contact", "lost"),
    ]
    assert lead["audiences"] == [
        {"name": "site_visitors", "journey": "doors", "added_at": iso(T0), "removed_at": None}
    ]
    assert lead["emails"] == [
        {
            "template": "order_thanks",
            "journey": "doors",
            "status": "sent",
            "queued_at": iso(NOW - timedelta(minutes=30)),
            "due_at": iso(NOW - timedelta(minutes=30)),
            "sent_at": iso(NOW - timedelta(minutes=29)),
            "attempts": 1,
            "last_error": None,
            "message_id": "<1@cjm.test>",
        }
    ]
    assert [(o["offer"], o["status"]) for o in lead["offers"]] == [("free_install", "pending")]
    assert [(s["sequence"], s["status"]) for s in lead["sequences"]] == [("door_tips", "pending")]
    assert lead["goals"] == [
        {"journey": "doors", "at": iso(NOW - timedelta(minutes=5)), "value": 1200.0}
    ]
    assert [event["message_id"] for event in lead["events"]] == ["m2", "m1", "m0"]
    assert lead["events"][0] == {
        "message_id": "m2",
        "type": "track",
        "name": "order_completed",
        "timestamp": iso(T0 + timedelta(hours=2)),
        "received_at": iso(T0 + timedelta(hours=2)),
        "processed_at": None,
        "error": None,
    }


async def test_an_unknown_lead_is_404(client: httpx.AsyncClient) -> None:
    response = await get(client, "/v1/leads/999")
    assert response.status_code == 404
    assert response.json() == {"detail": "no lead 999"}


async def test_a_merged_lead_id_answers_with_the_surviving_lead(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    survivor = await add_lead(runtime.db, ids=(("user", "u1"),))
    middle = await add_lead(runtime.db, merged_into=survivor)
    oldest = await add_lead(runtime.db, merged_into=middle)

    response = await get(client, f"/v1/leads/{oldest}")

    assert response.status_code == 200
    assert response.json()["id"] == survivor
    assert response.json()["merged_ids"] == [middle, oldest]


async def test_leads_are_found_by_user_id(client: httpx.AsyncClient, runtime: Runtime) -> None:
    wanted = await add_lead(runtime.db, ids=(("user", "u1"), ("anon", "a1")))
    await add_lead(runtime.db, ids=(("user", "u2"),))
    response = await get(client, "/v1/leads", user_id="u1")
    assert response.json() == [
        {
            "id": wanted,
            "user_id": "u1",
            "anonymous_ids": ["a1"],
            "traits": {},
            "created_at": iso(T0),
            "updated_at": iso(T0),
            "erased_at": None,
        }
    ]


async def test_leads_are_found_by_anonymous_id(client: httpx.AsyncClient, runtime: Runtime) -> None:
    wanted = await add_lead(runtime.db, ids=(("anon", "a1"),))
    await add_lead(runtime.db, ids=(("anon", "a2"),))
    response = await get(client, "/v1/leads", anonymous_id="a1")
    assert [lead["id"] for lead in response.json()] == [wanted]


async def test_leads_are_found_by_email_whatever_its_case(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    wanted = await add_lead(runtime.db, email="ann@x.test")
    await add_lead(runtime.db, email="bob@x.test")
    response = await get(client, "/v1/leads", email=" Ann@X.test ")
    assert [lead["id"] for lead in response.json()] == [wanted]


async def test_a_lead_found_through_a_merged_lead_is_the_survivor(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    survivor = await add_lead(runtime.db, ids=(("user", "u1"),))
    await add_lead(runtime.db, email="ann@x.test", merged_into=survivor)
    response = await get(client, "/v1/leads", email="ann@x.test")
    assert [lead["id"] for lead in response.json()] == [survivor]


async def test_filters_are_combined(client: httpx.AsyncClient, runtime: Runtime) -> None:
    await add_lead(runtime.db, email="ann@x.test", ids=(("user", "u1"),))
    response = await get(client, "/v1/leads", email="ann@x.test", user_id="u2")
    assert response.json() == []


async def test_without_a_filter_the_most_recent_leads_come_first(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    older = await add_lead(runtime.db, created_at=T0)
    newer = await add_lead(runtime.db, created_at=T0 + timedelta(hours=1))
    await add_lead(runtime.db, created_at=NOW, merged_into=newer)
    response = await get(client, "/v1/leads", limit=5)
    assert [lead["id"] for lead in response.json()] == [newer, older]
    limited = await get(client, "/v1/leads", limit=1)
    assert [lead["id"] for lead in limited.json()] == [newer]


async def test_a_lead_id_beyond_any_stored_id_is_a_client_error(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/leads/99999999999999999999", headers=ADMIN)
    assert response.status_code == 422


async def test_a_lookup_with_a_nul_character_is_a_client_error(client: httpx.AsyncClient) -> None:
    for query in ("user_id=a%00b", "anonymous_id=a%00b", "email=a%00b"):
        response = await client.get(f"/v1/leads?{query}", headers=ADMIN)
        assert response.status_code == 422, query

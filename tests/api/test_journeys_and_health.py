"""The journeys admin routes, /healthz, and the OpenAPI document."""

from __future__ import annotations

from pathlib import Path

import httpx

from engine.api.app import create_app
from engine.db.database import Database
from tests.api.conftest import ADMIN, DOORS, Runtime


async def test_journeys_are_listed_with_their_stages(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/journeys", headers=ADMIN)
    assert response.status_code == 200
    assert response.json() == [
        {
            "id": "doors",
            "name": "Entry doors",
            "version": 1,
            "versions": [1],
            "retired": False,
            "segment": {"name": "Homeowners", "description": None, "jobs": ["protect my home"]},
            "stages": [
                {
                    "id": "first_contact",
                    "name": "First contact",
                    "phase": "awareness",
                    "terminal": False,
                },
                {"id": "customer", "name": "Customer", "phase": "purchase", "terminal": False},
                {"id": "lost", "name": "Lost", "phase": "awareness", "terminal": True},
            ],
        }
    ]


async def test_a_journey_is_shown_as_its_file_defines_it(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/journeys/doors", headers=ADMIN)
    assert response.status_code == 200
    assert response.json() == DOORS.model_dump(mode="json", by_alias=True)
    assert response.json()["stages"][0]["transitions"][1] == {"after": "2h", "to": "lost"}


async def test_an_unknown_journey_is_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/journeys/windows", headers=ADMIN)
    assert response.status_code == 404
    assert response.json() == {"detail": "no journey 'windows'"}


async def test_healthz_is_ok_when_the_database_answers(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


async def test_healthz_is_503_when_the_database_does_not_answer(
    runtime: Runtime, tmp_path: Path
) -> None:
    runtime.db = Database(f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'dir' / 'cjm.db'}")
    transport = httpx.ASGITransport(app=create_app(runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://cjm.test") as client:
        response = await client.get("/healthz")
    await runtime.db.close()
    assert (response.status_code, response.json()) == (503, {"status": "unavailable"})


async def test_openapi_documents_tracking_bodies_and_both_keys(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    components = document["components"]
    assert {"TrackCall", "PageCall", "IdentifyCall", "AliasCall", "BatchCall"} <= set(
        components["schemas"]
    )
    assert set(components["securitySchemes"]) == {"writeKey", "signature", "adminKey"}
    track = document["paths"]["/v1/track"]["post"]
    assert track["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/TrackCall"
    }
    assert document["paths"]["/v1/leads/{lead_id}"]["get"]["security"] == [{"adminKey": []}]
    lead = document["paths"]["/v1/leads/{lead_id}"]["get"]["responses"]["200"]
    assert lead["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/LeadDetail"
    }

"""The offers admin API: look a code up, redeem it (a shop's checkout calling in), and
each journey's offer figures."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, HTTPException
from fastapi import Path as FastApiPath
from fastapi.responses import JSONResponse
from sqlalchemy import select

from channels.offers.store import offer_figures, redeem
from engine.api.schemas import OfferFiguresView, OfferView
from engine.db.schema import offer_codes
from engine.journey.model import MAX_CODE_LENGTH

if TYPE_CHECKING:
    from engine.api.app import AppRuntime

Code = Annotated[str, FastApiPath(min_length=1, max_length=MAX_CODE_LENGTH, pattern=r"^[^\x00]+$")]


def offers_router(runtime: AppRuntime) -> APIRouter:
    router = APIRouter(tags=["offers"])

    @router.get(
        "/v1/offers/{code}",
        summary="One offer code and its state",
        responses={404: {"description": "No offer has this code."}},
    )
    async def get_offer(code: Code) -> OfferView:
        async with runtime.db.read() as connection:
            row = (
                await connection.execute(
                    select(offer_codes).where(offer_codes.c.code.in_({code, code.upper()}))
                )
            ).first()
        if row is None:
            raise HTTPException(404, f"no offer has the code {code!r}")
        return offer_view(row)

    @router.post(
        "/v1/offers/{code}/redeem",
        summary="Redeem a code, once; refused (409) after it expired or was redeemed",
        responses={
            404: {"description": "No offer has this code."},
            409: {"description": "The code expired (the refusal is counted) or was redeemed."},
        },
    )
    async def redeem_offer(code: Code) -> Any:
        now = runtime.clock.now()
        async with runtime.db.write() as connection:
            result = await redeem(connection, code, at=now, via="api", now=now)
        if result.outcome == "unknown":
            raise HTTPException(404, f"no offer has the code {code!r}")
        view = offer_view(result.offer).model_dump(mode="json")
        if result.outcome == "redeemed":
            return view
        detail = "the code has expired" if result.outcome == "expired" else "already redeemed"
        return JSONResponse({"detail": detail, "offer": view}, status_code=409)

    @router.get(
        "/v1/journeys/{journey_id}/offers",
        summary="Each offer of the journey: codes granted, redeemed, expired",
        responses={404: {"description": "No journey has this id."}},
    )
    async def journey_offers(journey_id: str) -> list[OfferFiguresView]:
        journey = runtime.book.current.get(journey_id)
        if journey is None:
            raise HTTPException(404, f"no journey {journey_id!r}")
        async with runtime.db.read() as connection:
            figures = {row.offer: row for row in await offer_figures(connection, journey_id)}
        views = []
        for name in sorted({*journey.offers, *figures}):
            row = figures.get(name)
            terms = journey.offers.get(name)
            views.append(
                OfferFiguresView(
                    journey=journey_id,
                    offer=name,
                    title=terms.title if terms is not None else None,
                    granted=row.granted if row else 0,
                    redeemed=row.redeemed if row else 0,
                    expired=row.expired if row else 0,
                    redemption_rate=row.redemption_rate if row else None,
                    refused_after_expiry=row.refused_after_expiry if row else 0,
                )
            )
        return views

    return router


def offer_view(row: Any) -> OfferView:
    return OfferView(
        offer=row.offer,
        journey=row.journey_id,
        code=row.code,
        status=row.status,
        granted_at=row.granted_at,
        expires_at=row.expires_at,
        redeemed_at=row.redeemed_at,
        expired_at=row.expired_at,
        refused_after_expiry=row.refused,
    )

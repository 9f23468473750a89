"""The public links of an email: open pixel, tracked clicks, one-click unsubscribe.

Each carries a signed token (channels.email.tokens) naming the email and the lead,
and for a click the destination itself, so the redirect can only go where the token
says. The signing key is generated on first use and kept in the database, shared by
every process.
"""

from __future__ import annotations

import secrets as random
from datetime import datetime

from sqlalchemy import select

from channels.email.tokens import Sealer
from engine.db.database import Database
from engine.db.queries import upsert
from engine.db.schema import secrets

SECRET_NAME = "email_links"
OPEN, CLICK, UNSUBSCRIBE = "open", "click", "unsubscribe"


class Links:
    def __init__(self, base_url: str, sealer: Sealer) -> None:
        self.base_url = base_url.rstrip("/")
        self.sealer = sealer

    @classmethod
    async def load(cls, db: Database, base_url: str, now: datetime) -> Links:
        """Links signed with the stored key; the first process to start creates it."""
        async with db.write() as connection:
            await connection.execute(
                upsert(connection, secrets).on_conflict_do_nothing(),
                [{"name": SECRET_NAME, "value": random.token_urlsafe(32), "created_at": now}],
            )
            value = await connection.scalar(
                select(secrets.c.value).where(secrets.c.name == SECRET_NAME)
            )
        assert value is not None
        return cls(base_url, Sealer(value.encode()))

    def open_pixel(self, email_id: int, lead_id: int) -> str:
        token = self.sealer.seal(OPEN, {"email": email_id, "lead": lead_id})
        return f"{self.base_url}/e/open/{token}"

    def click(self, email_id: int, lead_id: int, url: str) -> str:
        token = self.sealer.seal(CLICK, {"email": email_id, "lead": lead_id, "url": url})
        return f"{self.base_url}/e/click/{token}"

    def unsubscribe(self, email_id: int, lead_id: int) -> str:
        token = self.sealer.seal(UNSUBSCRIBE, {"email": email_id, "lead": lead_id})
        return f"{self.base_url}/e/unsubscribe/{token}"

"""The shapes of the HTTP API, as pydantic models so that /docs shows them.

Tracking bodies are parsed by `engine.ingest.messages` (faster, with precise
reasons); their models here only describe the contract in the OpenAPI document.
The admin answers are validated through their models on the way out.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Id = str | int
JsonObject = dict[str, Any]
# Consulted only when the call has neither HTTP Basic nor a signature, and only as text;
# any other value is as if absent, so no type is required of it.
BodyWriteKey = Annotated[
    Any,
    Field(
        description="The write key, as text, for clients that cannot send HTTP Basic; read"
        " only when the call carries neither HTTP Basic nor a signature."
    ),
]


# --- tracking request bodies (documentation) -----------------------------------------------------


class _Call(BaseModel):
    """What every Segment call may carry; unknown fields are ignored. A call names its
    person by userId, anonymousId or both."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={"anyOf": [{"required": ["userId"]}, {"required": ["anonymousId"]}]},
    )

    userId: Id | None = Field(None, description="Your id for the person, once known.")
    anonymousId: Id | None = Field(None, description="The browser's or device's id.")
    messageId: Id | None = Field(None, description="Deduplicates: a repeated id is ignored.")
    timestamp: datetime | None = Field(
        None, description="When it happened (ISO-8601; without an offset, UTC)."
    )
    sentAt: datetime | None = Field(
        None, description="When the client sent it; corrects the client's clock skew."
    )
    context: JsonObject | None = None
    writeKey: BodyWriteKey = None


class TrackCall(_Call):
    event: Annotated[str, Field(min_length=1, max_length=200)]
    properties: JsonObject | None = None


class PageCall(_Call):
    name: str | None = None
    properties: JsonObject | None = Field(
        None, description="path, url, title, referrer...; `path` is derived from `url` if absent."
    )


class ScreenCall(PageCall):
    pass


class IdentifyCall(_Call):
    traits: JsonObject | None = Field(
        None, description="email, phone, first_name, last_name, city, country, timezone..."
    )


class AliasCall(_Call):
    previousId: Id
    userId: Id


class BatchCall(BaseModel):
    # The items are checked one by one, not as part of the request: a batch whose items
    # are all wrong is still a well-formed request, answered with the list of rejections.
    batch: Annotated[
        list[Any],
        Field(
            min_length=1,
            description="Calls of any type, each with its `type` (track, page, screen, identify,"
            " alias) and the fields of that call. An item that is not a valid call is rejected"
            " alone and listed in the answer's `rejected`.",
        ),
    ]
    context: JsonObject | None = Field(None, description="Merged under each message's context.")
    writeKey: BodyWriteKey = None


# --- tracking answers ----------------------------------------------------------------------------


class Accepted(BaseModel):
    success: Literal[True] = True


class RejectedMessage(BaseModel):
    index: int
    messageId: str | None
    error: str


class BatchAccepted(BaseModel):
    success: Literal[True] = True
    accepted: int
    rejected: list[RejectedMessage]


class TrackingError(BaseModel):
    success: Literal[False] = False
    error: str
    accepted: int | None = Field(None, description="Batch only: none of its messages was stored.")
    rejected: list[RejectedMessage] | None = None


# --- admin answers -------------------------------------------------------------------------------


class Problem(BaseModel):
    """Why an admin route refused a request, e.g. a missing or wrong admin key."""

    detail: str


class StageSummary(BaseModel):
    id: str
    name: str
    phase: str
    terminal: bool


class SegmentSummary(BaseModel):
    name: str
    description: str | None
    jobs: list[str]


class JourneySummary(BaseModel):
    id: str
    name: str
    version: int
    versions: list[int]
    retired: bool
    segment: SegmentSummary | None
    stages: list[StageSummary]


class LeadSummary(BaseModel):
    id: int
    user_id: str | None
    anonymous_ids: list[str]
    traits: JsonObject
    created_at: datetime
    updated_at: datetime
    erased_at: datetime | None = Field(
        None, description="When the person was erased on request: nothing personal is left."
    )


class Erased(BaseModel):
    """What an erasure removed, by kind (also recorded, without personal data)."""

    id: int
    erased_at: datetime
    counts: dict[str, int]


class TimerView(BaseModel):
    due_at: datetime
    stage: str
    to: str | None = Field(None, description="The stage the timeout moves to, when known.")


class HistoryEntry(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    from_: str | None = Field(alias="from")
    to: str | None
    at: datetime
    cause: JsonObject


class EnrollmentView(BaseModel):
    journey: str
    version: int
    entry: int
    stage: str
    state: str = Field(description="active, exited or completed")
    entered_at: datetime
    stage_entered_at: datetime
    ended_at: datetime | None
    timers: list[TimerView]
    history: list[HistoryEntry]


class AudienceView(BaseModel):
    name: str
    journey: str
    added_at: datetime
    removed_at: datetime | None


class EmailView(BaseModel):
    """One email and its fate: queued, sending, sent, deferred (to `due_at`: a retry, the
    sequence's sending window or the frequency cap; `last_error` says which), failed,
    suppressed, skipped (the lead has no address) or cancelled (its sequence stopped)."""

    template: str
    journey: str
    status: str
    queued_at: datetime
    due_at: datetime
    sent_at: datetime | None
    attempts: int
    last_error: str | None
    message_id: str | None


class OfferView(BaseModel):
    """A time-limited offer of the lead: `pending` (decided, code not issued yet),
    `granted`, `redeemed` or `expired`."""

    offer: str
    journey: str
    code: str | None
    status: str
    granted_at: datetime
    expires_at: datetime | None
    redeemed_at: datetime | None = None
    expired_at: datetime | None = None
    refused_after_expiry: int = 0


class OfferFiguresView(BaseModel):
    journey: str
    offer: str
    title: str | None
    granted: int
    redeemed: int
    expired: int
    redemption_rate: float | None = Field(description="redeemed / granted")
    refused_after_expiry: int = Field(description="Redemptions refused: the code had expired")


class SequenceView(BaseModel):
    """One run of a nurture sequence: pending (started, not yet picked up), active,
    completed, or stopped (`stop_reason` says why: stop_on, exited, unsubscribed...)."""

    sequence: str
    journey: str
    status: str
    step: int = Field(description="How many of its steps have been carried out")
    steps: int | None = Field(description="Its steps in all (null if the version is unknown)")
    next_at: datetime | None = Field(
        description="When the next step is due; null while an email is on its way"
    )
    started_at: datetime
    ended_at: datetime | None
    stop_reason: str | None


class GoalView(BaseModel):
    journey: str
    at: datetime
    value: float | None


class EventView(BaseModel):
    message_id: str
    type: str
    name: str
    timestamp: datetime
    received_at: datetime
    processed_at: datetime | None
    error: str | None


class LeadDetail(LeadSummary):
    user_ids: list[str]
    merged_ids: list[int]
    journeys: list[EnrollmentView]
    audiences: list[AudienceView]
    emails: list[EmailView]
    offers: list[OfferView]
    sequences: list[SequenceView]
    goals: list[GoalView]
    events: list[EventView]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]

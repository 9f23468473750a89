"""The journeys a process runs: every version still in use, and which one is current."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

from engine.journey.model import Journey


@dataclass(frozen=True)
class JourneyBook:
    """Journeys by id and version.

    `current` holds the version new leads enter. Older versions stay so that leads
    whose stage is gone from the current map keep running on the map they entered.
    A journey in `retired` is no longer in the files: its leads run on, nobody enters.
    """

    current: Mapping[str, Journey]
    versions: Mapping[tuple[str, int], Journey] = field(default_factory=dict)
    retired: frozenset[str] = frozenset()

    @classmethod
    def of(cls, journeys: Iterable[Journey]) -> JourneyBook:
        """A book of one version per journey."""
        current = {journey.id: journey for journey in journeys}
        return cls(current, {(j.id, j.version): j for j in current.values()})

    def journey(self, journey_id: str, version: int) -> Journey:
        return self.versions[(journey_id, version)]

    @cached_property
    def entries_on(self) -> Mapping[str, tuple[Journey, ...]]:
        """Journeys a lead may enter, by the event name of their entry."""
        by_event: dict[str, list[Journey]] = {}
        for journey in self.current.values():
            if journey.id not in self.retired:
                by_event.setdefault(journey.entry.on, []).append(journey)
        return {name: tuple(journeys) for name, journeys in by_event.items()}

"""Journey maps: the typed model, and loading it from YAML with every error's line."""

from engine.journey.loader import (
    JourneySet,
    JourneySource,
    load_journey_file,
    load_journey_text,
    load_journeys,
)
from engine.journey.model import Journey
from engine.journey.validate import JourneyError, JourneyErrors

__all__ = [
    "Journey",
    "JourneyError",
    "JourneyErrors",
    "JourneySet",
    "JourneySource",
    "load_journey_file",
    "load_journey_text",
    "load_journeys",
]

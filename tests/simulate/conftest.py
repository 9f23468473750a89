"""The journey both simulation test modules run: DOORS written to a journeys folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.journey import Journey, load_journeys

from .test_simulate import DOORS


@pytest.fixture
def journeys_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "journeys"
    directory.mkdir()
    (directory / "doors.yaml").write_text(DOORS)
    monkeypatch.setenv("CJM_JOURNEYS_DIR", str(directory))
    return directory


@pytest.fixture
def doors(journeys_dir: Path) -> Journey:
    return load_journeys([journeys_dir])["doors"]

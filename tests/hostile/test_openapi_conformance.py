"""Every documented operation, fed generated input by schemathesis, answers below 500
and as its OpenAPI document says (status, content type, headers, body schema), and
refuses what the document does not allow.

The app is the one `cjm serve` runs: the engine's own runtime on a real SQLite file,
the repository's journeys and templates, the write key and the admin key supplied to
the routes that need them. Generation is derandomized and bounded, so a run is the
same run every time.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from fastapi import FastAPI
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.generation import GenerationMode
from schemathesis.generation.case import Case
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.schemas import BaseSchema
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from engine.api.app import create_app
from engine.config import Settings
from engine.runtime import Runtime
from tests.api.conftest import ADMIN_KEY, SIGNING_SECRET, WRITE_KEY

REPOSITORY = Path(__file__).resolve().parents[2]
# A journey and an audience of the repository's journeys (journeys/doors.yaml).
EXISTING = {"journey_id": "doors", "name": "site_visitors"}
EXAMPLES_PER_OPERATION = 10
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
# The keys, by the security scheme the document names: schemathesis sends the one each
# operation asks for, and knows that a request carrying it is authorised.
CREDENTIALS = SchemathesisConfig.from_dict(
    {
        "auth": {
            "openapi": {
                "writeKey": {"username": WRITE_KEY, "password": ""},
                "adminKey": {"bearer": ADMIN_KEY},
            }
        }
    }
)


def _app(database_url: str) -> FastAPI:
    settings = Settings(
        database_url=database_url,
        journeys_dir=REPOSITORY / "journeys",
        templates_dir=REPOSITORY / "templates" / "emails",
        base_url="https://cjm.example",
        write_key=WRITE_KEY,
        admin_key=ADMIN_KEY,
        signing_secret=SIGNING_SECRET,
    )
    return create_app(Runtime(settings, run_worker=False))


def _cases() -> list[Any]:
    """Each documented operation with valid input, and with invalid input where there
    is any (a path of plain text parameters and no query or body cannot be sent wrong);
    and where the path names a journey or an audience, once more with one that exists,
    so the query and body reach the code behind the lookup. Building the document needs
    no database."""
    document = _app("sqlite+aiosqlite:///unused.db").openapi()
    cases = []
    for path, item in document["paths"].items():
        names = set(re.findall(r"\{(\w+)\}", path))
        for method, operation in item.items():
            method = method.upper()
            modes = [GenerationMode.POSITIVE]
            if "requestBody" in operation or any(
                _can_be_wrong(parameter) for parameter in operation.get("parameters", [])
            ):
                modes.append(GenerationMode.NEGATIVE)
            for mode in modes:
                cases.append(pytest.param(method, path, mode, {}, id=f"{method} {path} {mode}"))
                if names and names <= EXISTING.keys():
                    known = {name: EXISTING[name] for name in names}
                    label = " ".join(known.values())
                    cases.append(
                        pytest.param(
                            method, path, mode, known, id=f"{method} {path} {mode} {label}"
                        )
                    )
    return cases


def _can_be_wrong(parameter: dict[str, Any]) -> bool:
    schema = parameter["schema"]
    return parameter["in"] != "path" or schema.get("type") != "string" or len(schema) > 2


@pytest.fixture(scope="module")
def api_schema(
    sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BaseSchema]:
    """The schema as the running app serves it; schemathesis starts the app's lifespan
    (the runtime) on its own event loop, and it is stopped when the module is done."""
    path = tmp_path_factory.mktemp("openapi") / "cjm.db"
    shutil.copy(sqlite_template, path)
    try:
        app = _app(f"sqlite+aiosqlite:///{path}")
        yield schemathesis.openapi.from_asgi("/openapi.json", app, config=CREDENTIALS)
    finally:
        shutdown_lifespans()


@pytest.mark.parametrize(("method", "path", "mode", "path_parameters"), _cases())
def test_operation_answers_below_500_and_as_documented(
    api_schema: BaseSchema,
    method: str,
    path: str,
    mode: GenerationMode,
    path_parameters: dict[str, str],
) -> None:
    operation = api_schema[path][method]
    strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)

    @hypothesis.given(strategy)
    @hypothesis.settings(
        max_examples=EXAMPLES_PER_OPERATION,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    def answers_as_documented(case: Case) -> None:
        case.call_and_validate(checks=CHECKS)

    answers_as_documented()

"""The API against its own OpenAPI schema (schemathesis): requests generated from the
schema, valid and not, never get a 5xx, and every response matches the schema."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from api.main import app

schema = schemathesis.openapi.from_asgi("/openapi.json", app)
ADMIN_KEY = "unit-admin-4f1c9e7a2b6d8053e1a7c4f92d6b0e38"  # DESCENT_BOOTSTRAP_KEY in conftest.py: every route is reachable


@schema.auth()
class AdminKey:
    """Schemathesis sets the key on every case, except those that test a request
    without it (which must be refused)."""

    def get(self, case, context) -> str:  # noqa: ANN001
        return ADMIN_KEY

    def set(self, case, data: str, context) -> None:  # noqa: ANN001
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_honours_its_schema(case, migrated_db: str) -> None:  # noqa: ANN001
    # Two rules no JSON Schema can state, so a schema-valid request is rightly a 422
    # there: the list cursor is opaque (a string the API never issued is refused), and
    # a job spec has cross-field rules (warm-up shorter than the run, min_lr below lr,
    # nesterov needs momentum, a validation split with every class), a study's base and
    # space must make valid job specs, and an uploaded dataset file has to be readable
    # data (a schema says only "a file"). Every other check (no 5xx, responses as
    # documented, schema-violating input refused) applies.
    beyond_schema = (case.operation.path, case.operation.method.upper()) in {
        ("/v1/jobs", "GET"), ("/v1/jobs", "POST"), ("/v1/datasets", "POST"), ("/v1/studies", "GET"), ("/v1/studies", "POST")
    }
    case.call_and_validate(excluded_checks=[positive_data_acceptance] if beyond_schema else [])

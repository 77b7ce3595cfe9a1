"""A response that is a pydantic model already: serialized once, by the model.

A route returning a model lets FastAPI check it against `response_model` and serialize
it; for a plain `def` route that check runs in the thread pool, one more trip there per
request on the hottest routes (POST /v1/jobs, GET /v1/jobs/{id}). A route that built
its answer from the schema itself (JobPublic.from_row) returns it as this Response
instead: the same JSON, FastAPI's serializer skipped. `response_model` stays on the
route for the OpenAPI document.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import Response
from pydantic import BaseModel


class ModelResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        if not isinstance(content, BaseModel):
            raise TypeError(f"ModelResponse takes a pydantic model, not {type(content).__name__}")
        # by_alias, as FastAPI serializes a response_model.
        return content.model_dump_json(by_alias=True).encode()

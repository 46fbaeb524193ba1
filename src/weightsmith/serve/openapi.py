"""The server's OpenAPI document, built from the request schemas (served at /openapi.json).

The routes read their bodies themselves (to bound their size and time, gate.py), so FastAPI
cannot describe them; this document does, from the same pydantic models that validate them.
It lets clients and API fuzzers (schemathesis, in the tests) know every request shape.

Not here: validation itself (schemas.py), the routes (app.py).
"""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from weightsmith.serve.response_schemas import ResponsesRequest
from weightsmith.serve.schemas import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
)

#: POST routes and the model of their JSON body.
BODIES = {
    "/v1/chat/completions": ChatRequest,
    "/v1/completions": CompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
    "/v1/responses": ResponsesRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
}
GETS = ("/health", "/v1/models", "/metrics")


def openapi_document(version: str) -> dict[str, Any]:
    """OpenAPI 3.1 for the JSON API: each POST body's schema, and the GET routes."""
    _, defs = models_json_schema(
        [(model, "validation") for model in BODIES.values()], ref_template="#/components/schemas/{model}"
    )
    answers = {"200": {"description": "the answer"}, "4XX": {"description": "OpenAI's error object"}}
    paths: dict[str, Any] = {path: {"get": {"responses": answers}} for path in GETS}
    for path, model in BODIES.items():
        body = {"$ref": f"#/components/schemas/{model.__name__}"}
        paths[path] = {"post": {"requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
                                "responses": answers}}  # fmt: skip
    return {
        "openapi": "3.1.0",
        "info": {"title": "weightsmith", "version": version},
        "paths": paths,
        "components": {"schemas": defs.get("$defs", {})},
    }

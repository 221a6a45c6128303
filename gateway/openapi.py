"""The OpenAPI document: fixed control-plane routes plus one path per deployed function, typed from its signature."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

_ERR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_JSON_TYPES = {"string", "integer", "number", "boolean", "array", "object"}


def _op(summary: str, ok: str = "200", body: dict[str, Any] | None = None, auth: bool = True,
        errors: tuple[str, ...] = ("400", "401", "404")) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {ok: {"description": "ok"}, **{e: _ERR for e in errors}}}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if auth:
        op["security"] = [{"bearer": []}]
    return op


def _schema_for(fr: Any) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for p in fr.signature.params:
        s: dict[str, Any] = {"type": p.type} if p.type in _JSON_TYPES else {}
        if p.nullable and s:
            s = {"anyOf": [s, {"type": "null"}]}
        props[p.name] = s
    return {"type": "object", "properties": props,
            "required": [p.name for p in fr.signature.params if p.required],
            "additionalProperties": fr.signature.var_kwargs}


def openapi_document(functions: Iterable[Any]) -> dict[str, Any]:
    name_param = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
    id_param = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
    paths: dict[str, Any] = {
        "/healthz": {"get": _op("Liveness", auth=False, errors=())},
        "/metrics": {"get": _op("Prometheus metrics", auth=False, errors=())},
        "/fn/{name}": {"post": {**_op("Call a function with a JSON object of keyword arguments",
                                      body={"type": "object"},
                                      errors=("400", "401", "402", "404", "413", "429", "500", "503", "504")),
                                "parameters": name_param}},
        "/v1/calls/{id}": {"get": {**_op("Status and result of an async call", auth=False), "parameters": id_param},
                           "delete": {**_op("Cancel an async call", auth=False, errors=("404", "409")),
                                      "parameters": id_param}},
        "/v1/deployments": {"post": _op("Deploy function bundles", "201", {"type": "object"})},
        "/v1/functions": {"get": _op("List your functions")},
        "/v1/functions/{name}": {"get": {**_op("Describe a function", auth=False), "parameters": name_param},
                                 "delete": {**_op("Delete a function", errors=("401", "403", "404")),
                                            "parameters": name_param}},
        "/v1/functions/{name}/rollback": {"post": {**_op("Roll back to a version", body={"type": "object"}),
                                                   "parameters": name_param}},
        "/v1/functions/{name}/logs": {"get": {**_op("Recent logs, newest first"), "parameters": name_param}},
        "/v1/keys": {"post": _op("Create an API key", "201", {"type": "object", "properties": {
            "name": {"type": "string"}}, "required": ["name"]})},
        "/v1/models": {"get": _op("Models the gateway serves, and the function serving each", auth=False,
                                  errors=())},
        "/v1/models/{model}": {"get": {**_op("One served model (OpenAI `models.retrieve`)", auth=False,
                                             errors=("404",)),
                                       "parameters": [{"name": "model", "in": "path", "required": True,
                                                       "schema": {"type": "string"}}]}},
        "/v1/chat/completions": {"post": _op("OpenAI chat completions", body={"type": "object"},
                                             errors=("400", "401", "402", "404", "413", "500", "503"))},
        "/v1/completions": {"post": _op("OpenAI completions (a prompt)", body={"type": "object"},
                                        errors=("400", "401", "402", "404", "413", "500", "503"))},
        "/v1/embeddings": {"post": _op("OpenAI embeddings", body={"type": "object"},
                                       errors=("400", "401", "402", "404", "413", "500", "503"))},
        "/v1/providers": {"get": _op("Provider nodes", auth=False, errors=()),
                          "post": _op("Register a provider node (signed; see runtime/registration.py)", "201",
                                      {"type": "object"}, auth=False, errors=("400", "401", "403", "413"))},
        "/v1/providers/{id}": {"get": {**_op("One provider node", auth=False, errors=("404",)),
                                       "parameters": id_param}},
        "/v1/providers/{id}/heartbeat": {"post": {**_op("Node heartbeat (node token)", body={"type": "object"},
                                                        errors=("400", "401", "404")), "parameters": id_param}},
        "/v1/providers/{id}/leave": {"post": {**_op("Node leaves (node token)", errors=("401", "404")),
                                              "parameters": id_param}},
        "/v1/providers/approvals": {"get": _op("Operator: admission mode and wallets", errors=("401", "403")),
                                    "post": _op("Operator: approve a wallet", body={"type": "object", "properties": {
                                        "wallet": {"type": "string"}}, "required": ["wallet"]},
                                        errors=("400", "401", "403"))},
        "/v1/payments/operator": {"get": _op("The operator's key and payout address", auth=False, errors=())},
        "/v1/channels": {"post": _op("Register a payment channel", "201", {"type": "object"}, auth=False,
                                     errors=("400", "404", "409"))},
        "/v1/ledger": {"get": _op("Operator: balances", errors=("401", "403"))},
    }
    for fr in sorted(functions, key=lambda f: f.name):
        paths[f"/fn/{fr.name}"] = {"post": _op(
            f"Call {fr.name} ({fr.spec.kind}, version {fr.version})", body=_schema_for(fr),
            errors=("400", "401", "402", "413", "429", "500", "503", "504"))}
    return {
        "openapi": "3.0.3",
        "info": {"title": "Cocoon FaaS gateway", "version": "1"},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "properties": {"error": {
                "type": "object", "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
                "required": ["type", "message"]}}}},
        },
    }

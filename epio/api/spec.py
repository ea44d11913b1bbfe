"""The API's description: component schemas, the operation registry, OpenAPI 3.1.

Every endpoint of :mod:`epio.api.web` is declared with :func:`operation`, which
records it here; :func:`openapi_document` builds ``/api/v1/openapi.json`` from
the records, so the document describes exactly the served endpoints.  Request
bodies are validated against these schemas (:mod:`epio.api.jsonschema`) and the
tests validate every response against them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from attrs import field, frozen

from epio import __version__, domain
from epio.store import store as _store

PREFIX = "/api/v1"

# One source for each rule: the store's own patterns (it refuses anything else), so the
# document is never looser nor stricter than the server (docs/api.md, "One source").
APP_NAME = domain.APP_NAME.pattern
USER_NAME = _store.USER_NAME.pattern
CONFIG_KEY = _store.CONFIG_KEY.pattern
PROCESS_TYPE = domain.PROCESS_TYPE.pattern
EMAIL = {"type": ["string", "null"], "pattern": _store.EMAIL.pattern,
         "maxLength": domain.MAX_EMAIL}
NO_NUL = "^[^\\x00]*$"
# log sources (web.1, run.3, router) and stats metric names or prefixes, as the logs
# part reads them (epio.api.logtail)
SOURCE_NAME = domain.LOG_SOURCE_NAME
SOURCE_LIST = rf"^\s*(?:{SOURCE_NAME})?\s*(?:,\s*(?:{SOURCE_NAME})?\s*)*$"
METRIC_NAME = r"^[A-Za-z0-9_.:-]{1,100}$"
HOSTNAME = domain.HOSTNAME.pattern
# the one message of every hostname the API will not add, malformed or refused
# (epio.api.domain.hostname_refused): it must not tell whether another account has it
HOSTNAME_RULE = (
    "must be a DNS name of two or more labels (or *. and such a name) that is not an IP "
    "address, not localhost, not under the platform domain (except under the app's own "
    "name) and not equal to, under or above a name another account has claimed")

# the rules in words, for the validation errors users see (jsonschema ``x-errors``)
INVALID_APP_NAME = {"code": "invalid_app_name",
                    "message": "{value!r} is not a valid app name: " + domain.APP_NAME_RULE}
INVALID_CONFIG_KEY = {
    "code": "invalid_config_key",
    "message": "{value!r} is not a valid config var name: use letters, digits and '_', "
               "not starting with a digit, at most 255 characters (like SECRET_KEY)"}

NUM = {"type": "number"}
STR = {"type": "string"}
INT = {"type": "integer"}
BOOL = {"type": "boolean"}
NULLABLE_STR = {"type": ["string", "null"]}
NULLABLE_NUM = {"type": ["number", "null"]}
NULLABLE_INT = {"type": ["integer", "null"]}


def obj(props: dict[str, Any], required: list[str] | None = None, extra: Any = False,
        **more: Any) -> dict[str, Any]:
    """An object schema; every property required unless ``required`` says otherwise."""
    out: dict[str, Any] = {"type": "object", "properties": props,
                           "required": list(props) if required is None else required,
                           "additionalProperties": extra}
    out.update(more)
    return out


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def array(item: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": item}


SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": obj({"error": obj({"code": STR, "message": STR})}),
    "User": obj({"id": STR, "name": STR, "email": NULLABLE_STR, "is_admin": BOOL,
                 "created": NUM}),
    "NewUser": obj({
        "name": {"type": "string", "pattern": USER_NAME},
        "email": EMAIL,
        "is_admin": BOOL,
    }, required=["name"]),
    "UserWithToken": obj({"user": ref("User"), "token": STR}),
    "Token": obj({"id": STR, "prefix": STR, "description": STR, "created": NUM,
                  "last_used": NULLABLE_NUM}),
    "NewToken": obj({"description": {"type": "string", "maxLength": 200}}, required=[]),
    "CreatedToken": obj({"token": STR, "info": ref("Token")}),
    "LoginCode": obj({
        "code": {"type": "string", "description": "one use, within `expires`: the "
                                                  "dashboard exchanges it for a token"},
        "expires": NUM}),
    "NewJoinToken": obj({
        "node_id": {"type": "string", "maxLength": 63,
                    "pattern": "^[A-Za-z0-9][A-Za-z0-9.-]*$",
                    "description": "the new node's id (default: node-<8 hex digits>)"},
        "ttl": {"type": "number", "minimum": 1, "maximum": 86400,
                "description": "seconds the token is valid (default 3600, at most 86400)"},
    }, required=[]),
    "JoinToken": obj({"id": STR, "node_id": STR, "created_by": STR, "created": NUM,
                      "expires": NUM, "used": {"type": ["number", "null"]},
                      "used_by": {"type": ["string", "null"]}}),
    "CreatedJoinToken": obj({
        "token": {"type": "string", "description": "shown once: the store keeps its hash"},
        "info": ref("JoinToken")}),
    "LoginExchange": obj({"code": {"type": "string", "minLength": 1, "maxLength": 200}}),
    "SignedIn": obj({"user": ref("User"), "token": STR}),
    "App": obj({
        "name": STR, "owner": STR, "url": STR, "created": NUM, "maintenance": BOOL,
        "release": NULLABLE_INT, "collaborators": array(STR),
        "processes": {"type": "object", "additionalProperties": INT,
                      "description": "running instances per process type"},
    }),
    "NewApp": obj({"name": {"type": "string", "pattern": APP_NAME,
                            "x-errors": {"pattern": INVALID_APP_NAME}}}),
    "AppDestroyed": obj({"deleted": STR, "destroyed": NUM, "purge_after": NUM}),
    "DestroyedApp": obj({
        "name": STR, "owner": STR, "created": NUM, "destroyed": NUM,
        "purge_after": {**NULLABLE_NUM,
                        "description": "when it is purged for good (epoch seconds); null "
                                       "while a purge runs"},
        "purging": {"type": "boolean", "description": "a purge has started: it can no "
                                                      "longer be restored"},
        "addons": array(STR),
    }),
    "Collaborator": obj({"user": {"type": "string", "minLength": 1}}),
    "Release": obj({
        "version": INT, "image": NULLABLE_STR, "processes": {"type": "object",
                                                           "additionalProperties": STR},
        "config_keys": array(STR), "description": STR, "created": NUM,
        "created_by": NULLABLE_STR, "current": BOOL,
        "status": {"type": "string", "enum": list(domain.RELEASE_STATES),
                   "description": "current: its instances serve (its rollout succeeded); "
                                  "deploying: rolling out; failed: it never served; "
                                  "superseded: any other"},
        "kept": {**NULLABLE_INT, "description": "failed: the release that kept running"},
        "deploy": {**NULLABLE_STR, "description": "the deploy (rollout) of this release"},
        "reason": {**NULLABLE_STR, "description": "failed: why"},
    }),
    "ConfigUpdate": obj({"vars": {"type": "object", "additionalProperties": STR},
                         "release": ref("Release")}),
    "Rollback": obj({"version": {"type": "integer", "minimum": 1}}, required=[]),
    "Restart": obj({"type": {"type": "string", "pattern": PROCESS_TYPE,
                             "description": "restart only this process type (default: "
                                            "every one)"}}, required=[]),
    "Deploy": obj({
        "id": STR, "app": STR,
        "status": {"type": "string", "enum": list(domain.DEPLOY_STATES)},
        "image": NULLABLE_STR, "release": NULLABLE_INT, "reason": NULLABLE_STR,
        "created": NUM, "finished": NULLABLE_NUM, "log": STR, "log_offset": INT,
        "url": STR,
    }),
    "ConfigVars": obj({"vars": {"type": "object", "additionalProperties": STR}}),
    "ConfigChange": {
        "type": "object",
        "description": "KEY: value sets a variable, KEY: null unsets it",
        "minProperties": 1,
        "patternProperties": {CONFIG_KEY: {"type": ["string", "null"],
                                           "maxLength": domain.MAX_CONFIG_VALUE,
                                           "pattern": NO_NUL}},
        "additionalProperties": False,
        "x-errors": {"additionalProperties": INVALID_CONFIG_KEY},
    },
    "ProcessFormation": obj({"type": STR, "quantity": INT, "size": STR, "command": NULLABLE_STR,
                             "limits": {"type": "object"}}),
    "Formation": obj({"processes": array(ref("ProcessFormation")),
                      "sizes": {"type": "object", "additionalProperties": {"type": "object"}}}),
    "FormationChange": obj({
        "processes": {
            "type": "object",
            "patternProperties": {PROCESS_TYPE: obj({
                "quantity": {"type": "integer", "minimum": 0, "maximum": 100},
                "size": STR,
            }, required=[])},
            "additionalProperties": False,
        },
    }),
    "Instance": obj({
        "id": STR, "name": STR, "type": STR, "number": INT, "release": INT,
        "node": NULLABLE_STR, "host": NULLABLE_STR, "port": NULLABLE_INT, "state": STR,
        "since": NUM, "restarts": INT,
    }),
    "Domain": obj({"hostname": STR, "wildcard": BOOL, "created": NUM, "builtin": BOOL}),
    "AddedDomain": obj({"hostname": STR, "wildcard": BOOL, "created": NUM, "builtin": BOOL,
                        "dns": obj({"state": {"type": "string",
                                              "enum": ["ok", "pending_dns", "unknown"]},
                                    "message": STR,
                                    "records": array(obj({"name": STR, "type": STR,
                                                          "value": STR}))})}),
    "Certificate": obj({"hostname": STR, "source": NULLABLE_STR, "state": STR,
                        "not_after": NULLABLE_NUM, "last_error": NULLABLE_STR,
                        "next_attempt": NULLABLE_NUM, "serving": BOOL}),
    "NewCertificate": obj({"hostname": {"type": "string", "maxLength": domain.HOSTNAME_MAX, "pattern": HOSTNAME,
                                        "x-error": HOSTNAME_RULE},
                           "certificate": {"type": "string", "maxLength": 65536},
                           "key": {"type": "string", "maxLength": 65536}}),
    "NewDomain": obj({"hostname": {"type": "string", "maxLength": domain.HOSTNAME_MAX, "pattern": HOSTNAME,
                                   "x-error": HOSTNAME_RULE}}),
    "Node": obj({"id": STR, "roles": array(STR), "control": NULLABLE_STR, "boot_id": NULLABLE_STR,
                 "last_seen": NUM, "alive": BOOL, "status": {"type": "object"}}),
    "Status": obj({"status": STR, "version": STR,
                   "api_url": {"type": ["string", "null"],
                               "description": "the API's URL through the routers "
                                              "(api.hostname), or null without a platform "
                                              "route: the URL clients should use"},
                   "routed": {"type": "boolean",
                              "description": "this request came through a router"}}),
    "Deleted": obj({"deleted": STR}),
    "LogLines": obj({
        "app": STR, "next": INT,
        "lines": array(obj({"id": INT, "timestamp": NUM, "source": STR, "text": STR,
                            "lost": INT}, required=["id", "timestamp", "source", "text"])),
    }),
    "Stats": obj({
        "app": STR, "resolution": INT,
        # metric -> [[bucket start, value], ...]
        "series": {"type": "object", "additionalProperties": array(array(NUM))},
    }),
}


@frozen
class Operation:
    """One endpoint: method, path (OpenAPI form, under PREFIX) and its bodies."""

    method: str
    path: str
    operation_id: str
    summary: str
    response: dict[str, Any] | None
    status: int = 200
    request: dict[str, Any] | None = None
    request_type: str = "application/json"
    auth: bool = True
    query: dict[str, dict[str, Any]] = field(factory=dict)
    tag: str = "platform"
    raw: bool = False  # the handler writes its own response (websocket upgrade, ...)
    response_type: str = "application/json"

    @property
    def app_scoped(self) -> bool:
        return "{app}" in self.path

    @property
    def path_params(self) -> list[str]:
        import re

        return re.findall(r"\{(\w+)\}", self.path)


ERROR_RESPONSES = {
    "400": "bad request (invalid_json, validation_failed, bad_request)",
    "401": "no valid token (unauthorized)",
    "403": "not allowed for this user (forbidden)",
    "404": "not found, or not yours (not_found)",
    "405": "method not allowed (method_not_allowed); the Allow header lists the methods",
    "409": "conflict with existing state (conflict, last_admin_token, not_a_cluster)",
    "413": "body too large (payload_too_large)",
    "415": "wrong content type (unsupported_media_type)",
    "422": "the upload did not build (build_failed)",
    "429": "a per-user limit; Retry-After says when to try again (rate_limited, "
           "app_quota_exceeded)",
    "500": "internal error (internal_error); logged, no details",
    "502": "a log server failed to answer (logs_error, stats_error)",
    "503": "a dependency is unavailable (unavailable, store_unavailable, "
           "app_uids_exhausted)",
}


def openapi_document(operations: Iterable[Operation]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``operations`` (``epio.api.web.OPERATIONS``)."""
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        params: list[dict[str, Any]] = [
            {"name": p, "in": "path", "required": True, "schema": STR} for p in op.path_params
        ]
        params += [
            {"name": name, "in": "query", "required": False, "schema": schema}
            for name, schema in op.query.items()
        ]
        responses: dict[str, Any] = {
            str(op.status): {
                "description": op.summary,
                **({"content": {op.response_type: {"schema": op.response}}}
                   if op.response is not None else {}),
            }
        }
        for status, text in ERROR_RESPONSES.items():
            if status == "401" and not op.auth:
                continue
            responses[status] = {"description": text,
                                 "content": {"application/json": {"schema": ref("Error")}}}
        entry: dict[str, Any] = {
            "operationId": op.operation_id,
            "summary": op.summary,
            "tags": [op.tag],
            "parameters": params,
            "responses": responses,
        }
        if not op.auth:
            entry["security"] = []
        if op.request is not None:
            content_schema = op.request if op.request_type == "application/json" else {
                "type": "string", "contentMediaType": op.request_type}
            entry["requestBody"] = {"required": True,
                                    "content": {op.request_type: {"schema": content_schema}}}
        paths.setdefault(PREFIX + op.path, {})[op.method.lower()] = entry
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "epio API",
            "version": __version__,
            "description": "Manage apps, deploys, releases, config, formation, domains and "
                           "nodes of an epio platform. Authenticate with "
                           "`Authorization: Bearer TOKEN`. Every app-scoped path answers 404 "
                           "to users who are neither the owner nor a collaborator.",
        },
        "servers": [{"url": "/"}],
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }

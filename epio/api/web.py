"""The HTTP adapter of the API role: Klein routes, auth, body checks, error layer.

Handlers are thin: they read the request (already authenticated and validated
by :meth:`Api._dispatch`), call the domain (:class:`epio.api.domain.Platform`)
and return a JSON-able value.  Every route is a method declared with
:func:`epio.api.operations.operation`; :class:`Api` (with its route mixins from
``addons``, ``cron`` and ``run``) builds its own Klein app from them, and
:data:`OPERATIONS` lists them for the OpenAPI document.  Errors are mapped in ONE place (:meth:`Api._error`, STYLE 13).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException
from werkzeug.exceptions import MethodNotAllowed as WzMethodNotAllowed
from werkzeug.exceptions import NotFound as WzNotFound

from epio.api import errors, serialize
from epio.api.addons import AddonRoutes
from epio.api.cron import CronRoutes
from epio.api.jsonschema import SchemaError, validate
from epio.api.operations import JSON, Handler, operation, operations_of, query_int
from epio.api.run import RunRoutes
from epio.api.spec import (
    METRIC_NAME,
    PREFIX,
    SCHEMAS,
    SOURCE_LIST,
    SOURCE_NAME,
    Operation,
    array,
    openapi_document,
    ref,
)

if TYPE_CHECKING:
    from epio.store.records import App, User

TARBALL_TYPES = ("application/gzip", "application/x-gzip", "application/x-tar",
                 "application/octet-stream", "application/x-compressed-tar")
DASHBOARD_DIR = Path(__file__).parent / "dashboard"

STR_SCHEMA = {"type": "string"}
#: the most seconds ``GET /apps/{app}/deploys/{id}?wait=`` holds its answer for a change
DEPLOY_WAIT_MAX = 10
_ROOT = {"components": {"schemas": SCHEMAS}}

async def authorize_app(platform: Any, request: IRequest, name: str) -> Any:
    """Auth + access check of ``platform`` for code mounted beside the API (the log
    tail): the app, or 404 when it is not the caller's; 503 ``starting`` without one."""
    if platform is None:
        raise errors.Unavailable("the api is starting; try again in a moment",
                                 code="starting")
    user = await platform.authenticate(_bearer(request))
    return await platform.get_app(user, name, logs=True)


#: The operations for which an admin may name the platform itself (its router access
#: log and stats, app ``epio``: epio.domain.PLATFORM_APP); every other one 404s on it.
PLATFORM_LOG_OPERATIONS = frozenset({"getLogs", "getStats"})


class Api(AddonRoutes, CronRoutes, RunRoutes):
    """The API (``/api/v1``) and dashboard of one api process.

    ``platform`` is the domain (:class:`epio.api.domain.Platform`); limits come
    from the ``api`` config section (bytes).
    """

    log = Logger()

    def __init__(self, platform: Any, *, max_json_bytes: int = 1 << 20,
                 max_upload_bytes: int = 200 << 20, log_tail: Any = None,
                 addons: Any = None, certs: Any = None, run: Any = None,
                 api_url: str | None = None) -> None:
        self.platform = platform  # None: the api is starting (503 ``starting``)
        self.api_url = api_url  # the routed URL (ApiSettings.platform_url), or None
        self.log_tail = log_tail  # epio.api.logtail.LogTail, None without a logger
        self.addons = addons  # epio.api.addons.Addons (add-on and backup routes)
        self.certs = certs  # epio.certs.api.Certs (certificate routes)
        self.run = run  # epio.api.run.RunSessions (epio run)
        self.max_json_bytes = max_json_bytes
        self.max_upload_bytes = max_upload_bytes
        self.app = self._routes()

    def _routes(self) -> Klein:
        """This api's own Klein app: every declared operation of its class, routed
        through :meth:`_dispatch`; the dashboard; the one error layer."""
        app = Klein()
        for name, op in operations_of(type(self)):
            path = PREFIX + re.sub(r"\{(\w+)\}", r"<\1>", op.path)
            app.route(path, methods=[op.method], strict_slashes=False,
                      endpoint=op.operation_id)(self._route(op, getattr(self, name)))
        app.route("/", methods=["GET"])(self.root)
        app.route("/dashboard/", methods=["GET"], branch=True)(self.dashboard)
        app.handle_errors(Exception)(self._error)
        return app

    def _route(self, op: Operation, f: Handler) -> Callable[..., Awaitable[Any]]:
        """The Klein endpoint of ``op``: the handler ``f`` behind :meth:`_dispatch`."""

        async def route(request: IRequest, **kw: str) -> Any:
            return await self._dispatch(op, f, request, kw)

        route.__name__ = route.__qualname__ = op.operation_id
        return route

    def resource(self) -> Any:
        return self.app.resource()

    # --- plumbing -------------------------------------------------------------

    async def _dispatch(self, op: Operation, f: Handler, request: IRequest,
                        kw: dict[str, str]) -> Any:
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        user = None
        if op.auth:
            if self.platform is None:
                raise errors.Unavailable("the api is starting; try again in a moment",
                                         code="starting")
            user = await self.platform.authenticate(_bearer(request))
        args: dict[str, Any] = dict(kw)
        if op.app_scoped:
            args["app"] = await self.platform.get_app(
                user, kw["app"], logs=op.operation_id in PLATFORM_LOG_OPERATIONS)
        if op.request is not None:
            if op.request_type == JSON:
                args["body"] = self._json_body(request, op)
            else:
                args["body"] = self._upload_body(request)
        result = await f(request, user, **args)
        if op.raw:
            return result
        request.setResponseCode(op.status)
        if result is None:
            return b""
        return _encode(result)

    def _content_type(self, request: IRequest) -> str:
        raw = request.getHeader(b"content-type") or b""
        return raw.decode("latin-1").split(";")[0].strip().lower()

    def _read_limited(self, request: IRequest, limit: int, upload: bool = False) -> bytes:
        content = request.content
        if getattr(request, "epio_oversize", False):
            raise errors.PayloadTooLarge(errors.too_large_message(None, limit, upload))
        content.seek(0, 2)
        size = content.tell()
        if size > limit:
            raise errors.PayloadTooLarge(errors.too_large_message(size, limit, upload))
        content.seek(0)
        data: bytes = content.read()
        return data

    def _json_body(self, request: IRequest, op: Operation) -> Any:
        if self._content_type(request) != JSON:
            raise errors.UnsupportedMediaType("the request body must be application/json")
        raw = self._read_limited(request, self.max_json_bytes)
        try:
            body = json.loads(raw.decode("utf-8"), parse_float=_json_number)
        except (UnicodeDecodeError, ValueError) as e:
            raise errors.InvalidJson(f"the request body is not valid JSON ({_short(e)})") from None
        assert op.request is not None
        try:
            validate(body, op.request, _ROOT)
        except SchemaError as e:
            raise errors.ValidationFailed(e.sentence(), code=e.code) from None
        return body

    def _upload_body(self, request: IRequest) -> bytes:
        if self._content_type(request) not in TARBALL_TYPES:
            raise errors.UnsupportedMediaType(
                "the upload must be a gzipped tarball (Content-Type: application/gzip)")
        data = self._read_limited(request, self.max_upload_bytes, upload=True)
        if not data:
            raise errors.BadRequest("the upload is empty")
        return data

    def _error(self, request: IRequest, failure: Failure) -> bytes:
        exc = failure.value
        api_error: errors.ApiError | None
        if isinstance(exc, WzNotFound):
            api_error = errors.NotFound("no such endpoint")
        elif isinstance(exc, WzMethodNotAllowed):
            allowed = ", ".join(sorted(set(exc.valid_methods or ())))
            api_error = errors.MethodNotAllowed(
                "method not allowed on this endpoint" + (f"; use {allowed}" if allowed else ""),
                headers={"Allow": allowed} if allowed else None)
        elif isinstance(exc, HTTPException):
            api_error = errors.ApiError(exc.description or exc.name, code="http_error",
                                        status=exc.code or 400)
        else:
            api_error = errors.to_api_error(exc) if exc is not None else None
        if api_error is None:
            self.log.failure("unhandled error answering {method} {path}", failure,
                             method=request.method.decode("latin-1"),
                             path=request.path.decode("latin-1", "replace"))
            api_error = errors.INTERNAL
        request.setResponseCode(api_error.status)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        for name, value in api_error.headers.items():
            request.setHeader(name.encode(), value.encode())
        return _encode(api_error.body())

    # --- meta -----------------------------------------------------------------

    @operation("GET", "/openapi.json", "getOpenApi", "This OpenAPI document",
               response={"type": "object"}, auth=False, tag="meta")
    async def openapi(self, request: IRequest, user: User) -> Any:
        return openapi_document(OPERATIONS)

    @operation("GET", "/status", "getStatus", "Liveness of this api process",
               response=ref("Status"), auth=False, tag="meta")
    async def status(self, request: IRequest, user: User) -> Any:
        from epio import __version__
        from epio.domain import ROUTER_VIA

        via = request.getHeader("via") or ""
        return {"status": "ok", "version": __version__, "api_url": self.api_url,
                "routed": via.strip() == ROUTER_VIA}

    # --- users and tokens -------------------------------------------------------

    @operation("GET", "/user", "getCurrentUser", "The user owning the token",
               response=ref("User"), tag="users")
    async def whoami(self, request: IRequest, user: User) -> Any:
        return serialize.user(user)

    @operation("GET", "/users", "listUsers", "Every user (admins only)",
               response=array(ref("User")), tag="users")
    async def list_users(self, request: IRequest, user: User) -> Any:
        return [serialize.user(u) for u in await self.platform.list_users(user)]

    @operation("POST", "/users", "createUser", "Create a user and a first token (admins only)",
               request=ref("NewUser"), response=ref("UserWithToken"), status=201, tag="users")
    async def create_user(self, request: IRequest, user: User, body: dict[str, Any]) -> Any:
        new, token = await self.platform.create_user(
            user, body["name"], body.get("email"), bool(body.get("is_admin", False)))
        return {"user": serialize.user(new), "token": token}

    @operation("GET", "/tokens", "listTokens", "The caller's API tokens (never the secrets)",
               response=array(ref("Token")), tag="users")
    async def list_tokens(self, request: IRequest, user: User) -> Any:
        return [serialize.token(t) for t in await self.platform.list_tokens(user)]

    @operation("POST", "/tokens", "createToken", "Create an API token for the caller",
               request=ref("NewToken"), response=ref("CreatedToken"), status=201, tag="users")
    async def create_token(self, request: IRequest, user: User, body: dict[str, Any]) -> Any:
        new = await self.platform.create_token(user, body.get("description", ""))
        return {"token": new.token, "info": serialize.token(new.info)}

    @operation("POST", "/login-codes", "createLoginCode",
               "A one-time code that signs the dashboard in as the caller (`epio login "
               "--web` puts it in a link's fragment); valid once, for 2 minutes",
               response=ref("LoginCode"), status=201, tag="users")
    async def create_login_code(self, request: IRequest, user: User) -> Any:
        code, expires = await self.platform.create_login_code(user)
        return {"code": code, "expires": expires}

    @operation("POST", "/login-codes/exchange", "exchangeLoginCode",
               "Exchange a one-time code for a new API token of its user (the dashboard's "
               "sign-in; the code is used up, valid or not)", request=ref("LoginExchange"),
               response=ref("SignedIn"), auth=False, tag="users")
    async def exchange_login_code(self, request: IRequest, user: User, body: dict[str, Any]) -> Any:
        if self.platform is None:
            raise errors.Unavailable("the api is starting; try again in a moment",
                                     code="starting")
        who, token = await self.platform.sign_in_with_code(body["code"])
        return {"user": serialize.user(who), "token": token}

    @operation("DELETE", "/tokens/{token_id}", "deleteToken", "Revoke one of the caller's tokens",
               response=ref("Deleted"), tag="users")
    async def delete_token(self, request: IRequest, user: User, token_id: str) -> Any:
        await self.platform.delete_token(user, token_id)
        return {"deleted": token_id}

    # --- cluster ----------------------------------------------------------------

    @operation("POST", "/cluster/join-tokens", "createJoinToken",
               "A single-use, expiring token with which one new host joins the cluster "
               "(`epio-admin join --store URL --token T`; admins only)",
               request=ref("NewJoinToken"), response=ref("CreatedJoinToken"), status=201,
               tag="cluster")
    async def create_join_token(self, request: Any, user: Any, body: dict[str, Any]) -> Any:
        new = await self.platform.create_join_token(user, body.get("node_id"), body.get("ttl"))
        return {"token": new.token, "info": serialize.join_token(new.info)}

    @operation("GET", "/cluster/join-tokens", "listJoinTokens",
               "Join tokens kept (never the tokens; admins only)",
               response=array(ref("JoinToken")), tag="cluster")
    async def list_join_tokens(self, request: Any, user: Any) -> Any:
        return [serialize.join_token(t) for t in await self.platform.list_join_tokens(user)]

    # --- apps -------------------------------------------------------------------

    @operation("GET", "/apps", "listApps", "Apps the caller owns or collaborates on",
               response=array(ref("App")), tag="apps")
    async def list_apps(self, request: IRequest, user: User) -> Any:
        return await self.platform.describe_apps(await self.platform.list_apps(user))

    @operation("POST", "/apps", "createApp", "Create an app owned by the caller",
               request=ref("NewApp"), response=ref("App"), status=201, tag="apps")
    async def create_app(self, request: IRequest, user: User, body: dict[str, Any]) -> Any:
        app = await self.platform.create_app(user, body["name"])
        return await self.platform.describe_app(app)

    @operation("GET", "/apps/{app}", "getApp", "One app", response=ref("App"), tag="apps")
    async def get_app(self, request: IRequest, user: User, app: App) -> Any:
        return await self.platform.describe_app(app)

    @operation("DELETE", "/apps/{app}", "deleteApp",
               "Destroy an app (owner only): final add-on backups, instances and routes "
               "stopped; everything else kept for api.destroyed_grace seconds, restorable",
               response=ref("AppDestroyed"), tag="apps")
    async def delete_app(self, request: IRequest, user: User, app: App) -> Any:
        destroyed = await self.platform.delete_app(user, app)
        return {"deleted": app.name, "destroyed": destroyed.destroyed,
                "purge_after": destroyed.purge_after}

    @operation("GET", "/destroyed-apps", "listDestroyedApps",
               "The caller's destroyed apps not purged yet (every one for admins)",
               response=array(ref("DestroyedApp")), tag="apps")
    async def list_destroyed(self, request: IRequest, user: User) -> Any:
        return await self.platform.describe_destroyed(await self.platform.list_destroyed(user))

    @operation("POST", "/destroyed-apps/{name}/restore", "restoreApp",
               "Bring a destroyed app back as it was (owner or admin)", response=ref("App"),
               tag="apps")
    async def restore_app(self, request: IRequest, user: User, name: str) -> Any:
        return await self.platform.describe_app(await self.platform.restore_app(user, name))

    @operation("DELETE", "/destroyed-apps/{name}", "purgeApp",
               "Purge a destroyed app now (owner or admin): add-ons, data and UID are gone",
               response=ref("Deleted"), tag="apps")
    async def purge_app(self, request: IRequest, user: User, name: str) -> Any:
        await self.platform.purge_app(user, await self.platform.get_destroyed(user, name))
        return {"deleted": name}

    @operation("GET", "/apps/{app}/collaborators", "listCollaborators",
               "Users who may manage the app besides its owner", response=array(STR_SCHEMA),
               tag="apps")
    async def list_collaborators(self, request: IRequest, user: User, app: App) -> Any:
        return await self.platform.list_collaborators(app)

    @operation("POST", "/apps/{app}/collaborators", "addCollaborator",
               "Let another user manage the app (owner only)", request=ref("Collaborator"),
               response=array(STR_SCHEMA), status=201, tag="apps")
    async def add_collaborator(self, request: IRequest, user: User, app: App,
                               body: dict[str, Any]) -> Any:
        await self.platform.add_collaborator(user, app, body["user"])
        return await self.platform.list_collaborators(app)

    @operation("DELETE", "/apps/{app}/collaborators/{name}", "removeCollaborator",
               "Remove a collaborator (owner only)", response=array(STR_SCHEMA), tag="apps")
    async def remove_collaborator(self, request: IRequest, user: User, app: App, name: str) -> Any:
        await self.platform.remove_collaborator(user, app, name)
        return await self.platform.list_collaborators(app)

    # --- deploys ----------------------------------------------------------------

    @operation("POST", "/apps/{app}/deploys", "createDeploy",
               "Upload a gzipped tarball of the app directory: build, release and roll out",
               request={"type": "string"}, request_type="application/gzip",
               response=ref("Deploy"), status=202, tag="deploys")
    async def create_deploy(self, request: IRequest, user: User, app: App, body: bytes) -> Any:
        deploy = await self.platform.start_deploy(user, app, body)
        return self.platform.describe_deploy(app, deploy, 0)

    @operation("GET", "/apps/{app}/deploys", "listDeploys", "Recent deploys, newest first",
               response=array(ref("Deploy")), tag="deploys",
               query={"limit": {"type": "integer", "minimum": 1, "maximum": 200}})
    async def list_deploys(self, request: IRequest, user: User, app: App) -> Any:
        limit = query_int(request, "limit", 20, 1, 200)
        return [self.platform.describe_deploy(app, d, None)
                for d in await self.platform.list_deploys(app, limit)]

    @operation("GET", "/apps/{app}/deploys/{deploy_id}", "getDeploy",
               "A deploy's status and its log from character `log_offset` (poll to follow); "
               "with `wait`, the answer waits up to that many seconds for a longer log or "
               "the deploy's end",
               response=ref("Deploy"), tag="deploys",
               query={"log_offset": {"type": "integer", "minimum": 0},
                      "wait": {"type": "integer", "minimum": 0,
                               "maximum": DEPLOY_WAIT_MAX}})
    async def get_deploy(self, request: IRequest, user: User, app: App, deploy_id: str) -> Any:
        offset = query_int(request, "log_offset", 0)
        wait = query_int(request, "wait", 0, 0, DEPLOY_WAIT_MAX)
        deploy = await self.platform.watch_deploy(app, deploy_id, offset, wait)
        return self.platform.describe_deploy(app, deploy, offset)

    # --- releases ---------------------------------------------------------------

    @operation("GET", "/apps/{app}/releases", "listReleases", "Releases, newest first",
               response=array(ref("Release")), tag="releases")
    async def list_releases(self, request: IRequest, user: User, app: App) -> Any:
        return await self.platform.describe_releases(app)

    @operation("GET", "/apps/{app}/releases/{version}", "getRelease", "One release",
               response=ref("Release"), tag="releases")
    async def get_release(self, request: IRequest, user: User, app: App, version: str) -> Any:
        return await self.platform.describe_release(app, _version(version))

    @operation("POST", "/apps/{app}/rollback", "rollback",
               "New release on an earlier release's image and config (default: the one "
               "before the current)", request=ref("Rollback"), response=ref("Release"),
               status=201, tag="releases")
    async def rollback(self, request: IRequest, user: User, app: App, body: dict[str, Any]) -> Any:
        release = await self.platform.rollback(user, app, body.get("version"))
        return await self.platform.describe_release(app, release.version)

    @operation("POST", "/apps/{app}/restart", "restart",
               "Restart every instance (or those of one process type): a new release "
               "with the current release's image and config, rolled out like a config "
               "change (start-first: new instances serve before the old ones drain; a "
               "stop-first type stops first); poll its `deploy` to follow",
               request=ref("Restart"), response=ref("Release"), status=201,
               tag="processes")
    async def restart(self, request: IRequest, user: User, app: App, body: dict[str, Any]) -> Any:
        release = await self.platform.restart(user, app, body.get("type"))
        return await self.platform.describe_release(app, release.version)

    # --- config -------------------------------------------------------------------

    @operation("GET", "/apps/{app}/config", "getConfig", "The app's config vars",
               response=ref("ConfigVars"), tag="config")
    async def get_config(self, request: IRequest, user: User, app: App) -> Any:
        return {"vars": await self.platform.get_config(app)}

    @operation("PATCH", "/apps/{app}/config", "updateConfig",
               "Set (KEY: value) and unset (KEY: null) config vars; makes a new release "
               "whose rollout starts (its `status` is `deploying` until it serves)",
               request=ref("ConfigChange"), response=ref("ConfigUpdate"), tag="config")
    async def update_config(self, request: IRequest, user: User, app: App,
                            body: dict[str, Any]) -> Any:
        config, release = await self.platform.update_config(user, app, body)
        return {"vars": config, "release": await self.platform.describe_release(
            app, release.version)}

    # --- formation and processes ----------------------------------------------------

    @operation("GET", "/apps/{app}/formation", "getFormation",
               "Desired quantity and size per process type", response=ref("Formation"),
               tag="processes")
    async def get_formation(self, request: IRequest, user: User, app: App) -> Any:
        return await self.platform.describe_formation(app)

    @operation("PATCH", "/apps/{app}/formation", "scale",
               "Scale process types and set their size", request=ref("FormationChange"),
               response=ref("Formation"), tag="processes")
    async def scale(self, request: IRequest, user: User, app: App, body: dict[str, Any]) -> Any:
        await self.platform.scale(user, app, body["processes"])
        return await self.platform.describe_formation(app)

    @operation("GET", "/apps/{app}/ps", "listProcesses",
               "Instances with their node, state, since and restarts",
               response=array(ref("Instance")), tag="processes")
    async def ps(self, request: IRequest, user: User, app: App) -> Any:
        return [serialize.instance(i) for i in await self.platform.list_instances(app)]

    # --- domains ------------------------------------------------------------------

    @operation("GET", "/apps/{app}/domains", "listDomains",
               "Hostnames routed to the app (the built-in APP.DOMAIN first)",
               response=array(ref("Domain")), tag="domains")
    async def list_domains(self, request: IRequest, user: User, app: App) -> Any:
        return await self.platform.describe_domains(app)

    @operation("POST", "/apps/{app}/domains", "addDomain",
               "Route a custom hostname or a wildcard (*.example.com) to the app; a name "
               "that is malformed, an IP, localhost, the platform's or another account's "
               "claim is refused with one answer (400)", request=ref("NewDomain"),
               response=ref("AddedDomain"), status=201, tag="domains")
    async def add_domain(self, request: IRequest, user: User, app: App,
                         body: dict[str, Any]) -> Any:
        domain = await self.platform.add_domain(user, app, body["hostname"])
        # never fatal: the domain is saved; `dns` says which record is missing
        dns = (await self.certs.check_domain(app.name, domain.hostname, domain.wildcard)
               if self.certs is not None else
               {"state": "unknown", "message": "DNS not checked", "records": []})
        return {**serialize.domain(domain), "dns": dns}

    @operation("DELETE", "/apps/{app}/domains/{hostname}", "removeDomain",
               "Stop routing a hostname to the app", response=ref("Deleted"), tag="domains")
    async def remove_domain(self, request: IRequest, user: User, app: App, hostname: str) -> Any:
        await self.platform.remove_domain(user, app, hostname)
        return {"deleted": hostname}

    # --- certificates (epio.certs, docs/https.md) ------------------------------------

    @operation("GET", "/apps/{app}/certs", "listCertificates",
               "TLS certificate of each custom domain: source (acme/owner), state, expiry, "
               "last error", response=array(ref("Certificate")), tag="domains")
    async def list_certs(self, request: IRequest, user: User, app: App) -> Any:
        return await self._certs().describe(app)

    @operation("POST", "/apps/{app}/certs", "addCertificate",
               "Serve the owner's own certificate (PEM chain, leaf first, and its unencrypted "
               "key) for one of the app's domains", request=ref("NewCertificate"),
               response=ref("Certificate"), status=201, tag="domains")
    async def add_cert(self, request: IRequest, user: User, app: App, body: dict[str, Any]) -> Any:
        await self.platform._require_owner(user, app)
        return await self._certs().add(app, body["hostname"], body["certificate"], body["key"])

    def _certs(self) -> Any:
        if self.certs is None:
            raise errors.Unavailable("certificates are not available yet; try again")
        return self.certs

    # --- logs (epio.api.logtail, owned by the logs part) ---------------------------

    @operation("GET", "/apps/{app}/logs", "getLogs",
               "Recent log lines (filters: n, source, grep, since, until); with "
               "`Upgrade: websocket`, a live tail", response=ref("LogLines"), tag="logs",
               query={"n": {"type": "integer", "minimum": 0},
                      "source": {"type": "string", "pattern": SOURCE_LIST},
                      "grep": STR_SCHEMA, "since": STR_SCHEMA, "until": STR_SCHEMA}, raw=True)
    async def logs(self, request: IRequest, user: User, app: App) -> Any:
        if self.log_tail is None:
            raise errors.Unavailable("no logger is configured for this api",
                                     code="logs_unavailable")
        await self._check_sources(request, app)
        return await self.log_tail.handle(request, app.name)

    async def _check_sources(self, request: IRequest, app: App) -> None:
        """Refuse a well-formed source the app cannot have (``web.1`` and ``run.3``
        are checked by their type); a malformed one is the log tail's to refuse."""
        raw = (request.args or {}).get(b"source", [])
        asked = [s.strip() for v in raw for s in v.decode("utf-8", "replace").split(",")
                 if s.strip()]
        asked = [s for s in asked if re.fullmatch(SOURCE_NAME, s)]
        if not asked:
            return
        known = await self.platform.log_sources(app)
        for source in asked:
            if source.split(".")[0] not in known:
                raise errors.ValidationFailed(
                    f"{app.name} has no log source {source!r}; its sources are: "
                    + ", ".join(known) + " (a process type matches each instance: web "
                    "matches web.1, web.2, ...)", code="unknown_source")

    @operation("GET", "/apps/{app}/stats", "getStats",
               "The app's stats series (requests by status class, latency, memory, "
               "restarts) at 10 s or 1 min resolution", response=ref("Stats"), tag="logs",
               query={"metric": {"type": "string", "pattern": METRIC_NAME},
                      "since": STR_SCHEMA, "until": STR_SCHEMA,
                      "resolution": {"type": "integer", "enum": [10, 60]}}, raw=True)
    async def stats(self, request: IRequest, user: User, app: App) -> Any:
        if self.log_tail is None:
            raise errors.Unavailable("no logger is configured for this api",
                                     code="logs_unavailable")
        return await self.log_tail.handle_stats(request, app.name)

    async def authorize_app(self, request: IRequest, name: str) -> Any:
        """Auth + access check for code mounted beside the API (404 if not theirs)."""
        return await authorize_app(self.platform, request, name)

    # --- nodes --------------------------------------------------------------------

    @operation("GET", "/nodes", "listNodes",
               "Every node of the cluster, its roles and isolation facts (admins only)",
               response=array(ref("Node")), tag="nodes")
    async def list_nodes(self, request: IRequest, user: User) -> Any:
        return await self.platform.describe_nodes(user)

    # --- dashboard ----------------------------------------------------------------

    def root(self, request: IRequest) -> Any:
        request.redirect(b"/dashboard/")
        return b""

    def dashboard(self, request: IRequest) -> Any:
        request.setHeader(b"X-Frame-Options", b"DENY")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(
            b"Content-Security-Policy",
            b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            b"connect-src 'self'; frame-ancestors 'none'")
        if request.postpath and request.postpath[0] == b"static":
            return _static(request, b"/".join(request.postpath[1:]).decode("utf-8", "replace"))
        # Every other dashboard path is the one page; its script routes by location.
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        return (DASHBOARD_DIR / "index.html").read_bytes()



STATIC_TYPES = {".js": b"text/javascript; charset=utf-8", ".css": b"text/css; charset=utf-8",
                ".svg": b"image/svg+xml", ".png": b"image/png", ".ico": b"image/x-icon"}


def _static(request: IRequest, name: str) -> bytes:
    """A file of the dashboard's static directory (flat; no traversal possible)."""
    path = DASHBOARD_DIR / "static" / name
    ctype = STATIC_TYPES.get(path.suffix)
    if not re.fullmatch(r"[a-z0-9_-]+\.[a-z]+", name) or ctype is None or not path.is_file():
        request.setResponseCode(404)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"not found\n"
    request.setHeader(b"Content-Type", ctype)
    request.setHeader(b"Cache-Control", b"public, max-age=300")
    return path.read_bytes()


def _version(text: str) -> int:
    text = text[1:] if text[:1] in ("v", "V") else text
    try:
        value = int(text)
    except ValueError:
        raise errors.NotFound(f"no release {text!r}") from None
    if value < 1:
        raise errors.NotFound(f"no release {text!r}")
    return value


WS_BEARER = "epio.bearer."


def _bearer(request: IRequest) -> str:
    raw = request.getHeader(b"authorization")
    if not raw:
        # Browsers cannot set headers on a websocket: the dashboard offers the
        # subprotocols "epio.v1, epio.bearer.<token>" and the server selects epio.v1
        # (so the token is never echoed back).
        offered = (request.getHeader(b"sec-websocket-protocol") or b"").decode("latin-1")
        for proto in (p.strip() for p in offered.split(",")):
            if proto.startswith(WS_BEARER) and len(proto) > len(WS_BEARER):
                return proto[len(WS_BEARER):]
        raise errors.Unauthorized()
    header: str = raw.decode("latin-1")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise errors.Unauthorized("the Authorization header must be: Bearer TOKEN")
    return token.strip()


def _json_number(text: str) -> int | float:
    """A JSON number with a fraction or exponent: an int when its value is integral
    (JSON Schema counts 1.0 as an integer, so ``{"version": 1.0}`` is a valid
    integer field), a float otherwise."""
    value = float(text)
    if value.is_integer() and abs(value) <= 2 ** 53:
        return int(value)
    return value


def _short(e: Exception) -> str:
    text = str(e)
    return text if len(text) < 120 else text[:117] + "..."


def _encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=False).encode("utf-8") + b"\n"


#: every endpoint of the API, in the order of the OpenAPI document
OPERATIONS: tuple[Operation, ...] = tuple(op for _, op in operations_of(Api))

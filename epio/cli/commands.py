"""The platform commands of ``epio``: login, apps, deploy, ps, scale, config,
releases, rollback, domains, open.

Each ``cmd_*`` takes the parsed arguments and returns an exit status; output
is a human table, or the API's JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
import webbrowser
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from epio.cli.client import (
    APP_FILE,
    USAGE,
    Client,
    CliError,
    ProgressReader,
    config_path,
    load_config,
    progress_bar,
    resolve_app,
    save_config,
)
from epio.domain import DEPLOY_FINAL, SERVING_STATES


def out(args: argparse.Namespace, data: Any, human: Any) -> int:
    """Print ``data`` as JSON with --json, else call/print ``human``."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True))
    elif callable(human):
        human()
    elif human is not None:
        print(human)
    return 0


def table(rows: list[list[Any]], headers: list[str]) -> None:
    cells = [[str(c) for c in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def ago(ts: float | None) -> str:
    if ts is None:
        return "-"
    delta = max(0, int(time.time() - ts))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if delta >= size:
            return f"{delta // size}{unit} ago"
    return f"{delta}s ago"


def human_size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def app_of(args: argparse.Namespace, *dirs: Path) -> str:
    return resolve_app(getattr(args, "app", None), *dirs)


def confirm_name(args: argparse.Namespace, name: str, prompt: str, refused: str) -> None:
    """A destructive command goes on only when ``--confirm`` (or, on a terminal, the
    answer to ``prompt``) is ``name``; otherwise ``refused`` (e.g. "not deleted")."""
    confirm = args.confirm
    if confirm is None and sys.stdin.isatty():
        confirm = input(prompt).strip()
    if confirm != name:
        raise CliError(f"{refused}: confirm with --confirm {name}")


# --- login ---------------------------------------------------------------------------


#: seconds ``login`` waits for the routed URL an api node names before it keeps the URL
#: it was given (docs/cli.md)
ROUTED_PROBE_TIMEOUT = 5.0


def routed_refused(api: str, routed: str) -> str:
    """Why the routed URL an api names is not taken in place of ``api`` ("" if it may
    be): it must be http(s), and never plain http when ``api`` is https -- the token
    would then go in clear to whatever answers there, for every later command."""
    scheme = urlsplit(routed).scheme
    if scheme not in ("http", "https") or not urlsplit(routed).netloc:
        return f"the platform's routed URL {routed!r} is not an http(s) URL; kept {api}"
    if urlsplit(api).scheme == "https" and scheme != "https":
        return (f"the platform's routed URL {routed} is not https like {api}; kept {api} "
                "(the token is never moved to plain http)")
    return ""


def routed_default(api: str, token: str) -> tuple[str, str]:
    """The URL to keep for a login at ``api``, and why, when it is not ``api``: given an
    api node's own listener (the request did not come through a router) that names the
    platform's routed URL (``api.hostname``), the routed one -- once it answers, through
    a router, with this token, within :data:`ROUTED_PROBE_TIMEOUT` seconds."""
    status = Client(api, token).get("status") or {}
    routed = str(status.get("api_url") or "").rstrip("/")
    if status.get("routed") or not routed or routed == api:
        return api, ""
    refused = routed_refused(api, routed)
    if refused:
        return api, refused
    try:
        probe = Client(routed, token, timeout=ROUTED_PROBE_TIMEOUT)
        through = probe.get("status") or {}
        if not through.get("routed"):
            raise CliError(f"{routed} is not served through a router")
        probe.get("user")
    except CliError as e:
        return api, (f"the platform's routed URL {routed} did not answer ({e}); kept {api}, "
                     "an api node's own listener")
    return routed, (f"the platform's routed URL (you gave {api}, an api node's own "
                    "listener; --direct keeps it)")


def cmd_login(args: argparse.Namespace) -> int:
    if args.web:
        return login_web(args)
    if not args.api:
        args.api = os.environ.get("EPIO_API") or load_config().get("api")
    if not args.api:
        raise CliError("login needs --api URL (or --web, once logged in, to sign the "
                       "dashboard in)", USAGE)
    token = args.token
    if token is None:
        if sys.stdin.isatty():
            token = getpass.getpass("API token: ")
        else:
            token = sys.stdin.readline()
    token = (token or "").strip()
    if not token:
        raise CliError("no token given: pass --token TOKEN or type it (stdin)")
    api = args.api.rstrip("/")
    if "://" not in api:
        raise CliError(f"--api must be a URL such as https://epio.example.com or "
                       f"http://127.0.0.1:8000, not {api!r}")
    user = Client(api, token).get("user")
    note = ""
    if not args.direct:
        api, note = routed_default(api, token)
    cfg = load_config()
    cfg.update({"api": api, "token": token})
    path = save_config(cfg)
    return out(args, {"api": api, "user": user["name"], "config": str(path), "note": note},
               f"Logged in to {api} as {user['name']} (token saved in {path})"
               + (f"\n  {note}" if note else ""))


def login_web(args: argparse.Namespace) -> int:
    """Print a one-time link that signs the dashboard in as the logged-in user: its
    code is in the fragment (browsers never send it to a server) and the page
    exchanges it once, in a POST, for a token of its own."""
    client = Client.from_config()
    user = client.get("user")
    made = client.post("login-codes")
    link = f"{client.api}/dashboard/#signin={made['code']}"
    seconds = max(0, round(made["expires"] - time.time()))
    return out(args, {"url": link, "expires": made["expires"], "user": user["name"]},
               f"Open this link to sign the dashboard in as {user['name']} (it works once, "
               f"within {seconds} seconds):\n  {link}")


def cmd_logout(args: argparse.Namespace) -> int:
    cfg = load_config()
    cfg.pop("token", None)
    save_config(cfg)
    return out(args, {"logged_out": True}, f"Logged out (removed the token from {config_path()})")


def cmd_whoami(args: argparse.Namespace) -> int:
    user = Client.from_config().get("user")
    return out(args, user, user["name"] + (" (admin)" if user["is_admin"] else ""))


# --- apps ----------------------------------------------------------------------------


def cmd_apps_list(args: argparse.Namespace) -> int:
    apps = Client.from_config().get("apps")

    def human() -> None:
        if not apps:
            print("No apps yet: epio apps create NAME")
            return
        table([[a["name"], a["owner"], f"v{a['release']}" if a["release"] else "-",
                " ".join(f"{t}={n}" for t, n in sorted(a["processes"].items())) or "-",
                a["url"]] for a in apps], ["NAME", "OWNER", "RELEASE", "RUNNING", "URL"])

    return out(args, apps, human)


def cmd_apps_create(args: argparse.Namespace) -> int:
    app = Client.from_config().post("apps", {"name": args.name})
    remembered = None
    kept = None  # the app an existing .epio-app names: it is not overwritten
    if not args.no_remember:
        here = Path.cwd() / APP_FILE
        if not here.exists():
            here.write_text(app["name"] + "\n")
            remembered = here
        else:
            try:
                kept = here.read_text("utf-8").strip() or None
            except OSError:
                kept = "another app"
            if kept == app["name"]:
                kept, remembered = None, here

    def human() -> None:
        print(f"Created {app['name']}: {app['url']}")
        if remembered is not None:
            print(f"Remembered it in {remembered} (commands run here use it)")
            print("Deploy it with: epio deploy")
            return
        if kept is not None:
            print(f"Not remembered: {Path.cwd() / APP_FILE} already names {kept}, and "
                  f"commands run here still act on {kept}. Pass --app {app['name']}, or "
                  f"make it the default here with: echo {app['name']} > {APP_FILE}")
        print("Deploy it with: epio deploy DIR --app " + app["name"])

    return out(args, app, human)


def cmd_apps_info(args: argparse.Namespace) -> int:
    name = args.name or app_of(args)
    client = Client.from_config()
    app = client.get(f"apps/{name}")

    def human() -> None:
        print(f"=== {app['name']}")
        print(f"Owner:    {app['owner']}")
        print(f"URL:      {app['url']}")
        print(f"Release:  {('v' + str(app['release'])) if app['release'] else 'none yet'}")
        running = " ".join(f"{t}={n}" for t, n in sorted(app["processes"].items()))
        print(f"Running:  {running or 'nothing'}")
        if app["collaborators"]:
            print(f"Shared with: {', '.join(app['collaborators'])}")

    return out(args, app, human)


DESTROY_TIMEOUT = 3600.0  # seconds `epio apps destroy` waits (final database backups)


def until(ts: float) -> str:
    """A future time as UTC, to the minute."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def cmd_apps_destroy(args: argparse.Namespace) -> int:
    name = args.name
    confirm_name(args, name, f"This destroys {name}: it stops serving, and its data is "
                 "kept until its grace period ends, then purged. Type its name to confirm: ",
                 "not destroyed")
    client = Client.from_config()
    # destroying takes a final backup of the app's databases first: that may take long
    client.timeout = DESTROY_TIMEOUT
    result = client.delete(f"apps/{name}")
    return out(args, result, f"Destroyed {name}. Its data is kept until "
                             f"{until(result['purge_after'])}: `epio apps restore {name}` "
                             f"brings it back, `epio apps purge {name}` deletes it now.")


def cmd_apps_destroyed(args: argparse.Namespace) -> int:
    apps = Client.from_config().get("destroyed-apps")

    def human() -> None:
        if not apps:
            print("No destroyed apps.")
            return
        table([[a["name"], a["owner"], ago(a["destroyed"]),
                 "purging now" if a.get("purging") else until(a["purge_after"]),
                ",".join(a["addons"]) or None] for a in apps],
              ["NAME", "OWNER", "DESTROYED", "PURGED AFTER", "ADD-ONS"])

    return out(args, apps, human)


def cmd_apps_restore(args: argparse.Namespace) -> int:
    app = Client.from_config().post(f"destroyed-apps/{args.name}/restore")
    return out(args, app, f"Restored {args.name}: {app['url']}")


def cmd_apps_purge(args: argparse.Namespace) -> int:
    name = args.name
    confirm_name(args, name, f"This deletes destroyed app {name}, its databases and data "
                 "for good. Type its name to confirm: ", "not purged")
    Client.from_config().delete(f"destroyed-apps/{name}")
    return out(args, {"deleted": name}, f"Purged {name}")


# --- deploy --------------------------------------------------------------------------


def cmd_deploy(args: argparse.Namespace) -> int:
    directory = Path(args.dir or ".")
    if not directory.is_dir():
        raise CliError(f"{directory} is not a directory")
    name = app_of(args, directory)
    client = Client.from_config()
    from epio.appdir import make_tarball
    from epio.manifest import ManifestError, load_manifest

    try:  # every manifest error at once, before anything is uploaded
        load_manifest(directory)
    except ManifestError as e:
        raise CliError(f"{directory} cannot be deployed, its manifest has errors:\n  "
                       + "\n  ".join(e.errors)) from None
    try:
        tarball = make_tarball(directory)
    except (OSError, ValueError) as e:
        raise CliError(f"cannot pack {directory}: {e}") from None
    quiet = args.json
    try:
        size = tarball.stat().st_size
        show = progress_bar() if sys.stderr.isatty() and not quiet else (lambda d, t: None)
        with open(tarball, "rb") as f:
            try:
                deploy = client.request(
                    "POST", f"apps/{name}/deploys",
                    data=ProgressReader(f, size, show),  # type: ignore[arg-type]
                    content_type="application/gzip", length=size)
            except CliError as e:
                if e.code == "payload_too_large":
                    e.hint = biggest_entries(tarball)
                raise
    finally:
        try:
            os.unlink(tarball)
        except OSError:
            pass
    if not quiet:
        print(f"Uploaded {human_size(size)}; deploy {deploy['id'][:12]}")
    if args.no_wait:
        if quiet:
            print(json.dumps(deploy, indent=2, sort_keys=True))
        else:
            print(f"Not waiting (--no-wait): epio releases --app {name} shows how it went")
        return 0
    d = follow_deploy(client, name, deploy["id"], args,
                      BuildLog(client, name, deploy["created"]))
    if quiet:
        print(json.dumps(d, indent=2, sort_keys=True))
    elif "Deployed v" in d["log"] and ": http" not in d["log"].rsplit("Deployed v", 1)[1]:
        print(f"{name} v{d['release']} is running (it has no web process)")
    else:
        print(f"{name} is live at {d['url']}")
    return 0


#: the first wait between two looks at a deploy, and again after every change it shows;
#: each quiet look multiplies it by POLL_GROWTH up to --poll (1 s): "live" shows within
#: about a tenth of a second of the deploy's end, a quiet build costs the API one
#: request a second
POLL_FIRST = 0.1
POLL_GROWTH = 1.5
#: once the build is over (or no build log is followed), each look asks the API to hold
#: its answer up to this many seconds for the deploy's next line (``?wait=``): "live"
#: shows the moment the deploy ends, with no request a second meanwhile
DEPLOY_WAIT = 5
#: an answer that came back sooner than this with nothing new is from an API that
#: does not wait (an older one): the CLI sleeps PollPace's waits between looks then
WAITED_AT_LEAST = 0.5


class PollPace:
    """Seconds to sleep before the next look at something that is changing."""

    def __init__(self, ceiling: float) -> None:
        self.ceiling = ceiling
        self.wait = min(POLL_FIRST, ceiling)

    def next(self, changed: bool) -> float:
        """The wait after a look; ``changed``: that look showed something new."""
        if changed:
            self.wait = min(POLL_FIRST, self.ceiling)
        now = self.wait
        self.wait = min(self.wait * POLL_GROWTH, self.ceiling)
        return now


def follow_deploy(client: Client, name: str, deploy_id: str, args: argparse.Namespace,
                  build_log: BuildLog | None = None) -> dict[str, Any]:
    """Print a deploy's (or rollout's) progress until it ends; CliError unless it
    succeeded (the new release is current)."""
    quiet = args.json
    offset = 0
    deadline = time.monotonic() + args.timeout
    log = ""
    pace, status = PollPace(args.poll), None
    while True:
        # while its build log is printed, look every PollPace wait; then let the API
        # answer at the deploy's next change
        building = build_log is not None and not quiet and status in (None, "pending",
                                                                     "building", "built")
        wait = 0 if building else max(1, min(DEPLOY_WAIT, int(deadline - time.monotonic())))
        asked = time.monotonic()
        d: dict[str, Any] = client.get(f"apps/{name}/deploys/{deploy_id}", log_offset=offset,
                                       **({"wait": wait} if wait else {}))
        log += d["log"]
        if build_log is not None and not quiet and d["status"] == "failed" \
                and d["image"] is None:
            # the build's last lines say why it failed: they come (through the logs
            # pipeline) a little after the deploy is marked failed, and go before
            # "Deploy failed: ..."
            build_log.follow(until_end=BUILD_LOG_SETTLE)
        if d["log"] and not quiet:
            sys.stdout.write(d["log"])
            sys.stdout.flush()
        offset = d["log_offset"]
        if build_log is not None and not quiet and d["status"] in ("pending", "building",
                                                                    "built"):
            build_log.follow()
        if d["status"] in DEPLOY_FINAL:
            break
        if time.monotonic() > deadline:
            raise CliError(f"gave up following deploy {d['id'][:12]} after {args.timeout:g}s "
                           f"(it is {d['status']}); see `epio releases`")
        changed = bool(d["log"]) or d["status"] != status
        status = d["status"]
        if wait and (changed or time.monotonic() - asked >= WAITED_AT_LEAST):
            continue  # the API waited for this answer: ask again at once
        time.sleep(pace.next(changed))
    d["log"] = log
    if d["status"] != "succeeded":
        if quiet:
            print(json.dumps(d, indent=2, sort_keys=True))
        raise CliError(f"deploy failed: {d['reason'] or d['status']}")
    return d


def follow_release(client: Client, name: str, rel: dict[str, Any],
                   args: argparse.Namespace) -> None:
    """Wait until a release made by config set/unset or rollback serves (default), or
    fail saying which release keeps running; --no-wait returns at once."""
    if args.no_wait or not rel.get("deploy"):
        return
    try:
        follow_deploy(client, name, rel["deploy"], args)
    except CliError as e:
        now = client.get(f"apps/{name}/releases/{rel['version']}")
        if now["status"] == "failed":
            kept = f"; v{now['kept']} keeps running" if now.get("kept") else ""
            raise CliError(f"v{rel['version']} did not become healthy: "
                           f"{now['reason'] or 'failed'}{kept}") from None
        if now["status"] == "superseded":
            return  # a newer release carries this change on
        raise e from None
    if not args.json:
        print(f"v{rel['version']} is current")


BUILD_LOG_SETTLE = 5.0
"""Seconds `epio deploy` waits, after a failed build, for the build's last line (its
``!!!!!> build failed`` line) to reach the logs endpoint before it prints the failure."""

BUILD_END = "!!!!!> "  # the builder's failure line starts so


def biggest_entries(tarball: Path, count: int = 5) -> str:
    """The largest top-level entries of an upload, for what to put in .epioignore."""
    import tarfile

    sizes: dict[str, int] = {}
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for member in tar:
                top = member.name.lstrip("./").split("/", 1)
                key = top[0] + ("/" if len(top) > 1 or member.isdir() else "")
                sizes[key] = sizes.get(key, 0) + member.size
    except (OSError, tarfile.TarError):
        return "list what the app does not need in .epioignore (gitignore syntax)"
    largest = sorted(sizes.items(), key=lambda kv: -kv[1])[:count]
    return ("the largest parts of the upload are " + ", ".join(
        f"{k} ({human_size(v)})" for k, v in largest) + "; list what the app does not "
        "need in .epioignore")


class BuildLog:
    """Prints the app's ``build`` log lines (from the logs endpoint) while it builds.

    The logs endpoint belongs to the logger role; without it this prints nothing.
    """

    def __init__(self, client: Client, app: str, since: float) -> None:
        self.client = client
        self.app = app
        self.since = since
        self.last_id = -1
        self.available = True
        self.ended = False

    def follow(self, until_end: float = 0.0) -> None:
        """Print the new build lines; with ``until_end``, keep polling up to that many
        seconds until the build's failure line has been printed."""
        deadline = time.monotonic() + until_end
        while self.available:
            self._print_new()
            if self.ended or time.monotonic() >= deadline:
                return
            time.sleep(0.2)

    def _print_new(self) -> None:
        try:
            body = self.client.get(f"apps/{self.app}/logs", source="build", n=1000,
                                   since=f"{self.since:.3f}")
        except CliError:
            self.available = False
            return
        for line in (body or {}).get("lines", []):
            if isinstance(line, dict) and int(line.get("id", -1)) > self.last_id:
                self.last_id = int(line["id"])
                text = str(line.get("text", ""))
                self.ended = self.ended or text.startswith(BUILD_END)
                print(f"  | {text}")
        sys.stdout.flush()


# --- processes -----------------------------------------------------------------------


def cmd_ps(args: argparse.Namespace) -> int:
    from epio.cli.cron import failing_lines

    name = app_of(args)
    client = Client.from_config()
    ps = client.get(f"apps/{name}/ps")

    def human() -> None:
        if not ps:
            print(f"{name} runs no processes: {why_nothing_runs(client, name)}")
        else:
            table([[p["name"], f"v{p['release']}", p["state"], p["node"],
                    f"{p['host']}:{p['port']}" if p["port"] else None, ago(p["since"]),
                    p["restarts"]] for p in ps],
                  ["PROCESS", "RELEASE", "STATE", "NODE", "ADDRESS", "SINCE", "RESTARTS"])
        for line in failing_lines(client, name):
            print(line)

    return out(args, ps, human)


def why_nothing_runs(client: Client, name: str) -> str:
    """The reason an app runs nothing, with a command that would change it."""
    releases = [r for r in client.get(f"apps/{name}/releases") if r["image"]]
    if not releases:
        return "it has not been deployed yet (epio deploy)"
    live = [r for r in releases if r["status"] in ("current", "deploying")]
    if not live:
        last = releases[0]
        return (f"no release of it works (v{last['version']} {last['status']}"
                + (f": {last['reason']}" if last.get("reason") else "")
                + "); see `epio logs`, fix it and `epio deploy` again")
    procs = client.get(f"apps/{name}/formation")["processes"]
    declared = [p for p in procs if p["command"]]
    if declared and all(p["quantity"] == 0 for p in declared):
        return f"every process type is scaled to 0 (epio scale {declared[0]['type']}=1)"
    return (f"v{live[0]['version']} is {live[0]['status']} and its instances are not up yet "
            "(see `epio logs`)")


def cmd_scale(args: argparse.Namespace) -> int:
    name = app_of(args)
    changes: dict[str, dict[str, Any]] = {}
    for item in args.changes:
        ptype, sep, value = item.partition("=")
        if not sep or not ptype:
            raise CliError(f"scale takes TYPE=N[:SIZE] (like web=2), not {item!r}", USAGE)
        qty, _, size = value.partition(":")
        change: dict[str, Any] = {}
        if qty:
            if not qty.isdigit():
                raise CliError(f"{ptype}: the quantity must be a whole number like {ptype}=2, "
                               f"not {qty!r}", USAGE)
            change["quantity"] = int(qty)
        if size:
            change["size"] = size
        changes[ptype] = change
    client = Client.from_config()
    if changes:
        formation = client.patch(f"apps/{name}/formation", {"processes": changes})
    else:
        formation = client.get(f"apps/{name}/formation")

    def human() -> None:
        table([[p["type"], p["quantity"], p["size"], p["command"]]
               for p in formation["processes"]], ["TYPE", "QUANTITY", "SIZE", "COMMAND"])

    out(args, formation, human)
    wanted = {t: c["quantity"] for t, c in changes.items() if "quantity" in c}
    if wanted and not args.no_wait:
        wait_scaled(client, name, wanted, args)
    return 0


def wait_scaled(client: Client, name: str, wanted: dict[str, int],
                args: argparse.Namespace) -> None:
    """Until exactly the wanted number of each type runs healthy (old ones gone);
    CliError when one of them fails or crash-loops, or at --timeout."""
    deadline = time.monotonic() + args.timeout
    while True:
        releases = client.get(f"apps/{name}/releases")
        target = next((r["version"] for r in releases
                       if r["status"] in ("current", "deploying") and r["image"]), None)
        if target is None:
            if not args.json:
                print(f"{name} has no deployed release yet: its processes start with "
                      "`epio deploy`")
            return
        ps = client.get(f"apps/{name}/ps")
        missing = []
        for ptype, n in sorted(wanted.items()):
            mine = [p for p in ps if p["type"] == ptype]
            for p in mine:
                if p["release"] == target and (p["state"] == "failed" or (
                        p["state"] not in SERVING_STATES and p["restarts"] >= 3)):
                    raise CliError(f"{p['name']} did not become healthy ({p['state']}, "
                                   f"{p['restarts']} restarts); see `epio logs --app {name}`")
            # asleep: healthy, then slept without a request (docs/apps.md "Sleeping apps")
            healthy = sum(1 for p in mine
                          if p["release"] == target and p["state"] in SERVING_STATES)
            if healthy != n or len(mine) != n:
                missing.append(f"{ptype} {healthy}/{n} healthy ({len(mine)} running)")
        if not missing:
            if not args.json:
                print(f"{name}: " + ", ".join(f"{t}={n}" for t, n in sorted(wanted.items()))
                      + " running")
            return
        if time.monotonic() > deadline:
            raise CliError(f"gave up waiting after {args.timeout:g}s: " + "; ".join(missing))
        time.sleep(args.poll)


# --- config --------------------------------------------------------------------------


def cmd_config_list(args: argparse.Namespace) -> int:
    name = app_of(args)
    data = Client.from_config().get(f"apps/{name}/config")

    def human() -> None:
        if not data["vars"]:
            print(f"{name} has no config vars")
        for k, v in sorted(data["vars"].items()):
            print(f"{k}={v}")

    return out(args, data, human)


def cmd_config_get(args: argparse.Namespace) -> int:
    name = app_of(args)
    data = Client.from_config().get(f"apps/{name}/config")
    if args.key not in data["vars"]:
        raise CliError(f"{name} has no config var {args.key}")
    return out(args, {args.key: data["vars"][args.key]}, data["vars"][args.key])


def cmd_config_set(args: argparse.Namespace) -> int:
    name = app_of(args)
    changes: dict[str, str | None] = {}
    for item in args.pairs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"config set takes KEY=VALUE, not {item!r}", USAGE)
        changes[key] = value
    client = Client.from_config()
    data = client.patch(f"apps/{name}/config", changes)
    if not args.json:
        print(f"Set {', '.join(changes)} on {name}: v{data['release']['version']}")
    follow_release(client, name, data["release"], args)
    return out(args, data, lambda: None)


def cmd_config_unset(args: argparse.Namespace) -> int:
    name = app_of(args)
    client = Client.from_config()
    data = client.patch(f"apps/{name}/config", {k: None for k in args.keys})
    if not args.json:
        print(f"Unset {', '.join(args.keys)} on {name}: v{data['release']['version']}")
    follow_release(client, name, data["release"], args)
    return out(args, data, lambda: None)


# --- releases ------------------------------------------------------------------------


def cmd_releases(args: argparse.Namespace) -> int:
    name = app_of(args)
    rels = Client.from_config().get(f"apps/{name}/releases")

    def human() -> None:
        if not rels:
            print(f"{name} has no releases yet: epio deploy")
            return
        table([[f"v{r['version']}" + (" *" if r["current"] else ""),
                r["status"] + (f" (kept v{r['kept']})" if r.get("kept") else ""),
                (r["image"] or "")[:12] or None, r["description"], r["created_by"],
                ago(r["created"])] for r in rels],
              ["VERSION", "STATUS", "IMAGE", "DESCRIPTION", "BY", "CREATED"])

    return out(args, rels, human)


def cmd_rollback(args: argparse.Namespace) -> int:
    name = app_of(args)
    body: dict[str, Any] = {}
    if args.version:
        text = args.version.lstrip("vV")
        if not text.isdigit():
            raise CliError(f"rollback takes a release like v3, not {args.version!r}", USAGE)
        body["version"] = int(text)
    client = Client.from_config()
    rel = client.post(f"apps/{name}/rollback", body)
    target = rel["description"].rpartition(" v")[2]  # the API describes it "Rollback to vN"
    if not args.json:
        print(f"Rolled back {name} to v{target}: the new release v{rel['version']} runs "
              f"v{target}'s code and config")
    follow_release(client, name, rel, args)
    return out(args, rel, lambda: None)


def cmd_restart(args: argparse.Namespace) -> int:
    name = app_of(args)
    body: dict[str, Any] = {"type": args.type} if args.type else {}
    client = Client.from_config()
    rel = client.post(f"apps/{name}/restart", body)
    if not args.json:
        what = f"{args.type} instances" if args.type else "every instance"
        print(f"Restarting {what} of {name}: v{rel['version']} runs the same code and "
              "config on new processes")
    follow_release(client, name, rel, args)
    return out(args, rel, lambda: None)


# --- domains -------------------------------------------------------------------------


def cmd_domains_list(args: argparse.Namespace) -> int:
    name = app_of(args)
    domains = Client.from_config().get(f"apps/{name}/domains")

    def human() -> None:
        for d in domains:
            print(d["hostname"] + ("  (built in)" if d["builtin"] else ""))

    return out(args, domains, human)


def cmd_domains_add(args: argparse.Namespace) -> int:
    name = app_of(args)
    d = Client.from_config().post(f"apps/{name}/domains", {"hostname": args.hostname})

    def human() -> None:
        dns = d.get("dns") or {}
        print(f"Added {d['hostname']} to {name}")
        if dns.get("state") == "pending_dns":
            print(f"DNS is not in place yet: {dns['message']}")
            print("Create these records (the certificate is issued once they resolve):")
            for r in dns["records"]:
                value = r["value"] + ("." if r["type"] == "CNAME" else "")
                print(f"    {r['name']}.  {r['type']}  {value}")
        elif dns.get("message"):
            print(dns["message"])

    return out(args, d, human)


def cmd_domains_remove(args: argparse.Namespace) -> int:
    name = app_of(args)
    Client.from_config().delete(f"apps/{name}/domains/{quote(args.hostname, safe='*')}")
    return out(args, {"deleted": args.hostname}, f"Removed {args.hostname} from {name}")


# --- certificates (docs/https.md) -----------------------------------------------------


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def cmd_certs_list(args: argparse.Namespace) -> int:
    name = app_of(args)
    certs = Client.from_config().get(f"apps/{name}/certs")

    def human() -> None:
        if not certs:
            print(f"{name} has no custom domain (epio domains add HOSTNAME)")
        for c in certs:
            line = (f"{c['hostname']}  {c['state']}  source={c['source'] or '-'}  "
                    f"expires={_when(c['not_after'])}")
            if c["state"] == "failed":
                line += f"  retry={_when(c['next_attempt'])}"
            elif c["state"] == "pending_dns":
                line += f"  next check={_when(c['next_attempt'])}"
            print(line)
            if c["last_error"]:
                print(f"    last error: {c['last_error']}")

    return out(args, certs, human)


def cmd_certs_add(args: argparse.Namespace) -> int:
    name = app_of(args)
    try:
        cert = Path(args.cert).read_text()
        key = Path(args.key).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"epio: cannot read the certificate or key: {e}") from None
    c = Client.from_config().post(f"apps/{name}/certs",
                                  {"hostname": args.hostname, "certificate": cert, "key": key})
    return out(args, c, f"{c['hostname']} now serves your certificate "
                        f"(expires {_when(c['not_after'])})")


def cmd_open(args: argparse.Namespace) -> int:
    name = app_of(args)
    app = Client.from_config().get(f"apps/{name}")
    opened = webbrowser.open(app["url"]) if not args.json else False
    return out(args, {"url": app["url"], "opened": opened},
               app["url"] if opened else f"Open {app['url']} in your browser")


# --- parser --------------------------------------------------------------------------


ROLLOUT_WAIT = 600.0  # seconds config set/unset, rollback and scale wait by default


def waiting(p: argparse.ArgumentParser, timeout: float) -> None:
    """--no-wait, --timeout (and the tests' --poll) of a command that waits for a rollout."""
    p.add_argument("--no-wait", action="store_true",
                   help="return at once instead of waiting until the change serves")
    p.add_argument("--timeout", type=float, default=timeout,
                   help=f"seconds to wait ({timeout:g}); then give up with status 1")
    p.add_argument("--poll", type=float, default=1.0, help=argparse.SUPPRESS)  # longest wait


def _register_login(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add login, logout, whoami."""
    p = sub.add_parser("login", parents=[common], help="log in to an epio API",
                       description="Store the API URL and token (read from stdin when "
                                   "--token is not given) in the config dir, mode 0600. "
                                   "--web: print a one-time link that signs the dashboard "
                                   "in as the logged-in user.")
    p.add_argument("--api",
                   help="the API URL: the routed one, e.g. https://epio.example.com "
                        "(api.hostname, through the routers), or an api node's own "
                        "listener, e.g. http://127.0.0.1:8000 -- then the routed URL it "
                        "names is kept, once it answers (default: $EPIO_API, or the URL "
                        "of the last login)")
    p.add_argument("--direct", action="store_true",
                   help="keep the --api URL as given, even an api node's own listener")
    p.add_argument("--token", help="API token (default: read from stdin)")
    p.add_argument("--web", action="store_true",
                   help="print a one-time link that signs the dashboard in as you "
                        "(needs a login: uses the stored API URL and token)")
    p.set_defaults(func=cmd_login)
    p = sub.add_parser("logout", parents=[common], help="forget the stored token")
    p.set_defaults(func=cmd_logout)
    p = sub.add_parser("whoami", parents=[common], help="show the logged-in user")
    p.set_defaults(func=cmd_whoami)


def _register_apps(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add apps and its subcommands."""
    apps = sub.add_parser("apps", parents=[common], help="create, list, show, destroy apps",
                          description="Manage apps. Without a subcommand: list them.")
    apps.set_defaults(func=cmd_apps_list)
    asub = apps.add_subparsers(dest="apps_command", metavar="SUBCOMMAND")
    p = asub.add_parser("list", parents=[common], help="list your apps")
    p.set_defaults(func=cmd_apps_list)
    p = asub.add_parser("create", parents=[common], help="create an app",
                        description=f"Create an app and remember it in ./{APP_FILE}.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--no-remember", action="store_true", help=f"do not write ./{APP_FILE}")
    p.set_defaults(func=cmd_apps_create)
    p = asub.add_parser("info", parents=[common], help="show an app")
    p.add_argument("name", metavar="NAME", nargs="?")
    p.set_defaults(func=cmd_apps_info)
    p = asub.add_parser("destroy", parents=[common],
                        help="destroy an app (kept for a grace period, then purged)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--confirm", metavar="NAME", help="the app's name again (no prompt)")
    p.set_defaults(func=cmd_apps_destroy)
    p = asub.add_parser("destroyed", parents=[common],
                        help="list destroyed apps not purged yet")
    p.set_defaults(func=cmd_apps_destroyed)
    p = asub.add_parser("restore", parents=[common], help="bring a destroyed app back")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_apps_restore)
    p = asub.add_parser("purge", parents=[common],
                        help="delete a destroyed app and its data for good, now")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--confirm", metavar="NAME", help="the app's name again (no prompt)")
    p.set_defaults(func=cmd_apps_purge)


def _register_deploy(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add deploy (alias upload)."""
    p = sub.add_parser("deploy", aliases=["upload"], parents=[common],
                       help="deploy an app directory (ep.io's name: upload)",
                       description="Pack DIR (honouring .epioignore), upload it, follow the "
                                   "build and rollout, and print the app's URL.")
    p.add_argument("dir", metavar="DIR", nargs="?", default=".")
    waiting(p, 1200.0)
    p.set_defaults(func=cmd_deploy)


def _register_processes(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ps and scale."""
    p = sub.add_parser("ps", parents=[common], help="list the app's processes")
    p.set_defaults(func=cmd_ps)
    p = sub.add_parser("scale", parents=[common], help="scale process types (web=2 worker=1)",
                       description="Set quantities and sizes: epio scale web=2 worker=1:large. "
                                   "Without arguments, show the formation.")
    p.add_argument("changes", metavar="TYPE=N[:SIZE]", nargs="*")
    waiting(p, ROLLOUT_WAIT)
    p.set_defaults(func=cmd_scale)


def _register_config(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add config and its subcommands."""
    cfg = sub.add_parser("config", parents=[common], help="list, get, set, unset config vars",
                         description="Config vars; each change makes a new release.")
    cfg.set_defaults(func=cmd_config_list)
    csub = cfg.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    p = csub.add_parser("list", parents=[common], help="list config vars")
    p.set_defaults(func=cmd_config_list)
    p = csub.add_parser("get", parents=[common], help="print one config var")
    p.add_argument("key", metavar="KEY")
    p.set_defaults(func=cmd_config_get)
    p = csub.add_parser("set", parents=[common], help="set KEY=VALUE ...")
    p.add_argument("pairs", metavar="KEY=VALUE", nargs="+")
    waiting(p, ROLLOUT_WAIT)
    p.set_defaults(func=cmd_config_set)
    p = csub.add_parser("unset", parents=[common], help="unset KEY ...")
    p.add_argument("keys", metavar="KEY", nargs="+")
    waiting(p, ROLLOUT_WAIT)
    p.set_defaults(func=cmd_config_unset)


def _register_releases(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add releases, restart, rollback."""
    p = sub.add_parser("releases", parents=[common], help="list releases")
    p.set_defaults(func=cmd_releases)
    p = sub.add_parser("restart", parents=[common],
                       help="restart the app's processes (every type, or one)",
                       description="Replace every instance (or those of TYPE) with a new "
                                   "process of the same code and config: a new release, "
                                   "rolled out like a config change (start-first: the new "
                                   "ones serve before the old ones stop).")
    p.add_argument("type", metavar="TYPE", nargs="?", help="only this process type (web)")
    waiting(p, ROLLOUT_WAIT)
    p.set_defaults(func=cmd_restart)
    p = sub.add_parser("rollback", parents=[common], help="roll back to an earlier release",
                       description="Make a new release with an earlier release's image and "
                                   "config (default: the one before the current).")
    p.add_argument("version", metavar="vN", nargs="?")
    waiting(p, ROLLOUT_WAIT)
    p.set_defaults(func=cmd_rollback)


def _register_domains(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add domains and its subcommands."""
    dom = sub.add_parser("domains", parents=[common], help="list, add, remove hostnames")
    dom.set_defaults(func=cmd_domains_list)
    dsub = dom.add_subparsers(dest="domains_command", metavar="SUBCOMMAND")
    p = dsub.add_parser("list", parents=[common], help="list the app's hostnames")
    p.set_defaults(func=cmd_domains_list)
    p = dsub.add_parser("add", parents=[common], help="route a hostname (or *.suffix) here")
    p.add_argument("hostname", metavar="HOSTNAME")
    p.set_defaults(func=cmd_domains_add)
    p = dsub.add_parser("remove", parents=[common], help="stop routing a hostname here")
    p.add_argument("hostname", metavar="HOSTNAME")
    p.set_defaults(func=cmd_domains_remove)


def _register_certs(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add certs and its subcommands."""
    crt = sub.add_parser("certs", parents=[common], help="TLS certificates of custom domains")
    crt.set_defaults(func=cmd_certs_list)
    csub = crt.add_subparsers(dest="certs_command", metavar="SUBCOMMAND")
    p = csub.add_parser("list", parents=[common],
                        help="status, expiry and last error of each domain's certificate")
    p.set_defaults(func=cmd_certs_list)
    p = csub.add_parser("add", parents=[common], help="serve your own certificate for a domain")
    p.add_argument("hostname", metavar="HOSTNAME")
    p.add_argument("--cert", required=True, metavar="FILE",
                   help="PEM certificate chain, leaf first")
    p.add_argument("--key", required=True, metavar="FILE", help="its PEM private key")
    p.set_defaults(func=cmd_certs_add)


def _register_open(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add open."""
    p = sub.add_parser("open", parents=[common], help="open the app in a browser")
    p.set_defaults(func=cmd_open)


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the platform commands to the ``epio`` parser."""
    _register_login(sub, common)
    _register_apps(sub, common)
    _register_deploy(sub, common)
    _register_processes(sub, common)
    _register_config(sub, common)
    _register_releases(sub, common)
    _register_domains(sub, common)
    _register_certs(sub, common)
    _register_open(sub, common)

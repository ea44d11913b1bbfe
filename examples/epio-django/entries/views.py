import hashlib
import os
import platform

from django.conf import settings
from django.core.cache import cache
from django.db import connection
from django.http import HttpResponse, HttpResponseRedirect
from django.shortcuts import render

from bundle_config import config

from .models import Entry
from .queue import SIGNED, redis_client


def index(request):
    cache.add("visits", 0)
    visits = cache.incr("visits")
    with connection.cursor() as cur:
        cur.execute("SELECT current_database()")
        database = cur.fetchone()[0]
    entries = list(Entry.objects.all()[:50])
    thanked = cache.get_many(["thanked:%d" % e.id for e in entries])
    for e in entries:
        e.thanked = ("thanked:%d" % e.id) in thanked
    return render(request, "entries/index.html", {
        "greeting": os.environ.get("GREETING", ""),
        "entries": entries,
        "visits": visits,
        "database": database,
        "app_name": config["core"]["app_name"],
        "checkout": os.path.basename(settings.BASE_DIR),
        "python": platform.python_version(),
        "health_checks": cache.get("health-checks", 0),
    })


def sign(request):
    entry = Entry.objects.create(name=request.GET.get("name", "anonymous")[:80],
                                 text=request.GET.get("text", ""))
    # a card for the signer under MEDIA_ROOT (media/ links into the data directory)
    cards = os.path.join(settings.MEDIA_ROOT, "cards")
    os.makedirs(cards, exist_ok=True)
    with open(os.path.join(cards, "%d.txt" % entry.id), "w") as f:
        f.write("Thank you for signing, %s!\n" % entry.name)
    # the worker thanks them (manage.py thankyou)
    redis_client().rpush(SIGNED, entry.id)
    return HttpResponseRedirect("/")


def health(request):
    """The platform's health check ([http] health_check): answers once the cache does,
    and counts the checks."""
    cache.add("health-checks", 0)
    cache.incr("health-checks")
    return HttpResponse("ok", content_type="text/plain")


def compress(request):
    """What an asset compressor does at run time: combine the collected CSS into a new
    file under STATIC_ROOT/CACHE/ and answer its URL."""
    with open(os.path.join(settings.STATIC_ROOT, "entries", "style.css")) as f:
        css = " ".join(f.read().split())
    name = "site.%s.css" % hashlib.sha256(css.encode()).hexdigest()[:12]
    out = os.path.join(settings.STATIC_ROOT, "CACHE")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name), "w") as f:
        f.write(css)
    return HttpResponse(settings.STATIC_URL + "CACHE/" + name, content_type="text/plain")


def report(request):
    """A page with a bug: the average of no entries (a 500 that DEBUG = False hides)."""
    texts = [e.text for e in Entry.objects.filter(name="nobody")]
    average = sum(len(t) for t in texts) / len(texts)
    return HttpResponse("average length: %.1f" % average)

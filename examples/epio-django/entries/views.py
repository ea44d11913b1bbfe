import hashlib
import os

from django.conf import settings
from django.core.cache import cache
from django.db import connection
from django.http import HttpResponse, HttpResponseRedirect
from django.shortcuts import render

from bundle_config import config

from .models import Entry


def index(request):
    cache.add("visits", 0)
    visits = cache.incr("visits")
    with connection.cursor() as cur:
        cur.execute("SELECT current_database()")
        database = cur.fetchone()[0]
    return render(request, "entries/index.html", {
        "greeting": os.environ.get("GREETING", ""),
        "entries": Entry.objects.all()[:50],
        "visits": visits,
        "database": database,
        "app_name": config["core"]["app_name"],
    })


def sign(request):
    Entry.objects.create(name=request.GET.get("name", "anonymous")[:80],
                         text=request.GET.get("text", ""))
    return HttpResponseRedirect("/")


def health(request):
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

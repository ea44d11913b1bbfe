from django.http import HttpResponse
from django.shortcuts import render

from .models import Note


def index(request):
    if not Note.objects.exists():
        Note.objects.create(text="Hello from Django on epio")
    return render(request, "index.html", {"notes": Note.objects.order_by("id")})


def health(request):
    return HttpResponse("ok\n", content_type="text/plain")

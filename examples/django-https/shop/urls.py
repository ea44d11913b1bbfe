from django.conf import settings
from django.http import HttpResponse
from django.urls import path


def home(request):
    return HttpResponse("settings: %s; secure: %s" % (settings.SETTINGS_NAME, request.is_secure()),
                        content_type="text/plain")


def health(request):
    return HttpResponse("ok", content_type="text/plain")


urlpatterns = [path("", home), path("health/", health)]

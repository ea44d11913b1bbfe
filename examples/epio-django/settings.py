# ep.io-era settings: everything about the platform comes from bundle_config, read at
# import time (so the build's collectstatic needs the add-ons to exist already).
import os

from bundle_config import config

BASE_DIR = os.path.dirname(os.path.abspath(__file__))
DEBUG = False
SECRET_KEY = "only-used-on-a-laptop"  # the platform sets its own

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": config["postgres"]["database"],
        "USER": config["postgres"]["username"],
        "PASSWORD": config["postgres"]["password"],
        "HOST": config["postgres"]["host"],
        "PORT": config["postgres"]["port"],
    }
}

CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": "redis://:%s@%s:%s/0" % (
            config["redis"]["password"], config["redis"]["host"], config["redis"]["port"]),
        "KEY_PREFIX": "guestbook",
        "TIMEOUT": 600,
    }
}

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.staticfiles",
    "entries",
]
MIDDLEWARE = ["django.contrib.sessions.middleware.SessionMiddleware"]
ROOT_URLCONF = "guestbook.urls"  # [checkout] directory_name
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}]
USE_TZ = True
STATIC_URL = "/static/"
# ep.io kept collected static files in the data directory, where the app (an asset
# compressor) can add to them at run time
STATIC_ROOT = os.path.join(config["core"]["data_directory"], "static")
# media/ is a [symlinks] link into the data directory (the image is read-only)
MEDIA_ROOT = os.path.join(BASE_DIR, "media")
MEDIA_URL = "/media/"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

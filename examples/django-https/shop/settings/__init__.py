# development settings by default; production: DJANGO_SETTINGS_MODULE=shop.settings.production
from .base import *  # noqa: F401,F403

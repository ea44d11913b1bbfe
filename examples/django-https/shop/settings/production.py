from .base import *  # noqa: F401,F403

DEBUG = False
SETTINGS_NAME = "production"
ALLOWED_HOSTS = []  # the platform adds the app's hostnames
# TLS ends at the router, which says how the client came in
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = True
SECURE_REDIRECT_EXEMPT = [r"^health/$"]  # the platform's health check comes over HTTP
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True
SECURE_HSTS_SECONDS = 3600

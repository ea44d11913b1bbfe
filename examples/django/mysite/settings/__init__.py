"""Settings package: base settings, then an optional local_settings override."""

from .base import *  # noqa: F401,F403

try:
    from .local_settings import *  # noqa: F401,F403
except ImportError:
    pass

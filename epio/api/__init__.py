"""The ``api`` role: JSON API, dashboard and the scheduler (issue 7).

Layers (STYLE 9): :mod:`epio.api.web` (Klein adapters, auth, validation) calls
:mod:`epio.api.domain` (the platform's use cases), which calls the store and the
:mod:`epio.api.scheduler`; :mod:`epio.api.errors` maps typed exceptions to
``{"error": {"code", "message"}}`` once.
"""

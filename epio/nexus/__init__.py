"""The ``nexus`` role: where every app runs, built from heartbeats and the store.

See docs/nexus.md.  :func:`epio.nexus.service.make_service` builds the role;
:class:`epio.nexus.core.Nexus` is its logic on a clock.
"""

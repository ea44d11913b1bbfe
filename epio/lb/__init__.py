"""The ``lb`` role: epio's HTTP/1.1 router (see docs/router.md)."""

"""The logger role: receives log lines and stats, stores, serves and forwards them."""

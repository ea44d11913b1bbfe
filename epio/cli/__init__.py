"""The ``epio`` command line: talks only HTTP to the api role (STYLE 8)."""

"""The ``fedtune`` command line: the top layer, above ``simulations/``, ``coordinator/`` and
``client/``. Parsing only: each subcommand calls one library function."""

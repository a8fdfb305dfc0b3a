"""`python -m server ...`: the same CLI as the `subspec` console script."""

from server.cli import main

if __name__ == "__main__":  # the guard matters: spawned workers import this module as __mp_main__
    raise SystemExit(main())

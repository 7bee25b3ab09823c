"""``python -m securefml``: the same command line as the ``securefml`` script."""

from securefml.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m experiments.spdy``."""

from experiments.spdy.main import main

if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m experiments.cram``."""

from experiments.cram.main import main

if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m experiments.oneshot``."""

from experiments.oneshot.main import main

if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m experiments.surrogate``."""

from experiments.surrogate.main import main

if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m experiments.acdc``."""

from experiments.acdc.main import main

if __name__ == "__main__":
    raise SystemExit(main())

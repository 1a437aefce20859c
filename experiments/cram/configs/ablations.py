"""Ablations of the CrAM experiment: overrides of a config (history in ``RESULTS.md``).

Each variant is one command line, e.g. the ``rho`` ablation's ``0.05``::

    python -m experiments.cram --quick --epochs 3 --methods cram --rho 0.05

:func:`experiments._common.ablation_configs` builds and validates them all.
"""

ABLATIONS = {
    # CrAM+Multi's radius; one seed, 2,000 test images: no value clearly better, 0.1 kept.
    "rho": {
        "base": "quick",
        "common": {"epochs": 3, "methods": ("cram",)},
        "variants": {str(rho): {"rho": rho} for rho in (0.05, 0.1, 0.2, 0.4)},
    },
}

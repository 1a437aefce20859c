"""Ablations of the AC/DC experiment: overrides of a config (history in ``RESULTS.md``).

Each variant is one command line, e.g. the ``memorisation_sparsity`` ablation's ``0.9``::

    python -m experiments.acdc --memorisation only --memorisation-sparsity 0.9 \
        --memorisation-epochs 100

:func:`experiments._common.ablation_configs` builds and validates them all.
"""

ABLATIONS = {
    # At 90% the sparse model re-fits all 200 random labels inside a compressed phase; at 95%
    # it cannot: 0.95 is the default.
    "memorisation_sparsity": {
        "base": "default",
        "common": {"memorisation": "only", "memorisation_epochs": 100},
        "variants": {"0.9": {"memorisation_sparsity": 0.9}, "0.95": {}},
    },
}

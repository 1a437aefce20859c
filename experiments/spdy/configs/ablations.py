"""Ablations of the SPDY experiment: overrides of a config (history in ``RESULTS.md``).

Each variant is one command line, e.g. the ``search_score`` ablation's ``reference``::

    python -m experiments.spdy --checkpoint runs/spdy/checkpoint --search-gap-epochs 0

:func:`experiments._common.ablation_configs` builds and validates them all. The ablations of
settings that are now fixed (the timing clock, the channel table, channel multiples, the
level range, single-threaded timing) are recorded in ``RESULTS.md`` only.
"""

ABLATIONS = {
    # How each candidate profile of the search is scored: the stitched calibration loss (the
    # reference) or that loss after 2 passes of global AdaPrune (the default since it met
    # the 2x margins on the measured channel table).
    "search_score": {
        "base": "default",
        "common": {},
        "variants": {"reference": {"search_gap_epochs": 0}, "gap2": {"search_gap_epochs": 2}},
    },
}

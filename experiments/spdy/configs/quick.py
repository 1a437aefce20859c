"""Quick run (a few minutes on 2 CPU cores): 3 epochs on a 12,000-image training subset (about
280 steps, enough for the dense model to be within 3 points of the full run on MNIST), 6
levels, 512 calibration images, a short search and short reconstructions. Same pipeline and
schema as the full run."""

from experiments.spdy.configs.base import Config


def get_config() -> Config:
    """The quick configuration."""
    return Config(
        epochs=3,
        train_subset=12_000,
        test_subset=1_000,
        num_levels=6,
        calib_samples=512,
        adaprune_epochs=3,
        gap_epochs=5,
        randinits=16,
        maxnoimp=8,
        search_gap_epochs=1,
        timing_repeats=7,
        timing_batch=128,
    )

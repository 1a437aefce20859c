"""Quick run (a few minutes on 2 CPU cores): a narrower SmallCNN trained for 3 epochs on a
20,000-image training subset (about 470 steps, enough for the dense model and its BatchNorm
statistics to converge: within 3 points of the full run on MNIST), fewer calibration batches
and a 2,000-image test subset. Same pipeline and output schema as the full run."""

from experiments.oneshot.configs.base import Config


def get_config() -> Config:
    """The quick configuration."""
    return Config(
        epochs=3,
        train_subset=20_000,
        test_subset=2_000,
        widths=(16, 32, 64),
        learning_rate=0.1,
        calib_batches=20,
        calib_mode="cumulative",  # exact mean of 20 batches; EMA would need ~100
    )

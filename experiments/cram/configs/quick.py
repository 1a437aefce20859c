"""Quick run (under 5 minutes on 2 CPU cores): narrow SmallCNN, a training subset, one epoch,
fewer calibration batches and a test subset. Same pipeline and output schema as the full run."""

from experiments.cram.configs.base import Config


def get_config() -> Config:
    """The quick configuration."""
    return Config(
        epochs=1,
        train_subset=6_000,
        test_subset=2_000,
        widths=(16, 32, 64),
        learning_rate=0.1,
        calib_batches=20,
        calib_mode="cumulative",  # exact mean of 20 batches; EMA would need ~100
        eval_batch_size=500,
    )

"""Quick run (under 5 minutes on 2 CPU cores): narrow SmallCNN, training and test subsets,
10 epochs (dense 0-1, C 1-2, D 2-3, C 3-4, D 4-8, final C 8-10). Same pipeline and output
schema as the full run."""

from experiments.acdc.configs.base import Config


def get_config() -> Config:
    """The quick configuration."""
    return Config(
        epochs=10,
        train_subset=5_000,
        test_subset=2_000,
        widths=(16, 32, 64),
        memorisation_subset=2_000,
        memorisation_epochs=20,
        eval_batch_size=500,
    )

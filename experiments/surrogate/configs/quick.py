"""Quick run (a few minutes per task on 2 CPU cores): half-width models, 8,000 training and
2,000 test examples, 3 epochs (1 after extraction), two targets and a larger initial lambda (a
125-step penalty phase has no epoch to spare before pruning starts). Same pipeline and output
schema as the full run."""

from experiments.surrogate.configs.base import Config


def get_config() -> Config:
    """The quick configuration."""
    return Config(
        epochs=3,
        finetune_epochs=1,
        train_subset=8_000,
        test_subset=2_000,
        width=0.5,
        targets=(0.5, 0.25),
        lam0=0.1,
        latency_repeats=10,
    )

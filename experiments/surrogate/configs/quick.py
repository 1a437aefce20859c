"""Quick run (under 5 minutes on 2 CPU cores): narrower models, training and test subsets,
fewer epochs, two targets per task and faster lambda controllers (the penalty phases are only
60-160 steps long). Same pipeline and output schema as the full run."""

from experiments.surrogate.configs.base import Config


def get_config() -> Config:
    """The quick configuration."""
    return Config(
        latency_repeats=10,
        eval_batch_size=500,
        cnn_widths=(16, 32, 32, 64),
        cnn_epochs=3,
        cnn_finetune_epochs=1,
        cnn_targets=(0.5, 0.25),
        cnn_lam0=0.1,  # a 125-step penalty phase has no epoch to spare before pruning starts
        cnn_gain=0.03,
        cnn_train_subset=8_000,
        cnn_test_subset=2_000,
        sst2_epochs=3,
        sst2_learning_rate=2e-3,
        sst2_targets=(0.5, 0.3),
        sst2_gain=0.05,
        sst2_train_subset=10_000,
        sst2_warmup_steps=20,
        mlp_epochs=3,
        mlp_penalty_epochs=2,
        mlp_finetune_epochs=1,
        mlp_learning_rate=2e-3,
        mlp_targets=(0.3, 0.15),
        mlp_gain=0.1,
        mlp_train_subset=10_000,
        mlp_test_subset=2_000,
    )

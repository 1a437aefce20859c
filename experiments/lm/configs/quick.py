"""Quick run (under 5 minutes on 2 idle CPU cores): a narrower 2-layer GPT, 300 steps per
trainer, fewer calibration and validation windows, SPDY at 1.5x only. Same pipeline and output
schema as the full run."""

from experiments.lm.configs.base import Config


def get_config() -> Config:
    """The quick configuration."""
    return Config(
        iters=300,
        warmup_iters=30,
        num_layers=2,
        d_model=64,
        learning_rate=2e-3,
        calib_windows=32,
        eval_windows=200,
        sample_chars=100,
        checkpoint_every=300,
        spdy_speedups=(1.5,),
    )

"""The shared argparse glue of the experiments (experiments/cli.py)."""

import argparse

import pytest

from experiments.cli import comma_separated, non_negative_int, positive_int


def test_comma_separated_casts_strips_and_validates():
    ints = comma_separated(int, valid=lambda v: v > 0, expected="positive integers")
    assert ints("16, 32,64") == (16, 32, 64)
    for bad in ("", "16,,32", "16,x", "0,4", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"expected positive integers, got"):
            ints(bad)
    names = comma_separated(
        str, valid=lambda v: v in ("a", "b"), distinct=True, expected="names from a,b"
    )
    assert names("b,a") == ("b", "a")
    for bad in ("a,a", "a,c", "a,"):
        with pytest.raises(argparse.ArgumentTypeError, match="names from a,b"):
            names(bad)


def test_integer_argument_types():
    assert positive_int("3") == 3 and non_negative_int("0") == 0
    for fn, bad in ((positive_int, "0"), (positive_int, "1.5"), (non_negative_int, "-1")):
        with pytest.raises(argparse.ArgumentTypeError):
            fn(bad)

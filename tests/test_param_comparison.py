"""The parameter comparison the equivalence tests share (helpers.assert_params_close): its outlier allowance lets
a few isolated Adam elements through and nothing else."""

import pytest
import torch
from helpers import assert_params_close

N = 200_000  # elements; with outlier_fraction 1e-5, 2 may exceed atol
ALLOW = {"outlier_fraction": 1e-5, "outlier_atol": 2e-3}


def _pair(*diffs: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    b = torch.zeros(N)
    b[: len(diffs)] = torch.tensor(diffs)
    return {"w": torch.zeros(N)}, {"w": b}


def test_isolated_outliers_within_one_step_pass():
    assert_params_close(*_pair(1e-3, 1.9e-3), 1e-4, **ALLOW)


def test_more_outliers_than_allowed_fail():
    with pytest.raises(AssertionError, match="3 of 200000 parameter elements differ by more than 0.0001"):
        assert_params_close(*_pair(1e-3, 1e-3, 1e-3), 1e-4, **ALLOW)


def test_an_outlier_beyond_one_step_fails():
    with pytest.raises(AssertionError, match="exceeds 0.002"):
        assert_params_close(*_pair(3e-3), 1e-4, **ALLOW)


def test_a_bulk_shift_fails_and_the_default_allows_no_outlier():
    with pytest.raises(AssertionError, match="allowed 2"):
        assert_params_close({"w": torch.zeros(N)}, {"w": torch.full((N,), 2e-4)}, 1e-4, **ALLOW)
    with pytest.raises(AssertionError, match="allowed 0"):
        assert_params_close(*_pair(2e-4), 1e-4)

"""scripts/fixed_point.py solves the stage-2 loss exactly: answers known in closed form must come out."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import fixed_point  # noqa: E402


def deviations(noise: float, beta: float, positions: int = 4) -> np.ndarray:
    problem = fixed_point.Problem(positions, 2, noise, seed=3)
    averages = np.array([problem.order_average(x)[0] for x in problem.states])
    return fixed_point.solve(problem, beta) - averages


@pytest.mark.parametrize("beta", [1.0, 0.5, 0.0])
def test_consistent_conditionals_give_the_exact_log_marginal_for_every_beta(beta):
    problem = fixed_point.Problem(4, 2, 0.0, seed=3)
    f = fixed_point.solve(problem, beta)
    assert np.allclose(f, np.log(problem.model.ravel()), atol=1e-8)  # f(empty) = 0 and the model is normalised


def test_with_inconsistent_conditionals_only_the_td_gradient_reaches_the_order_average():
    assert np.abs(deviations(1.0, 0.0)).max() < 1e-8
    assert np.abs(deviations(1.0, 1.0)).max() > 0.05  # the paper's least squares sits off it (about 0.3 nats here)

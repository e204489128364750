"""Where the self-consistency loss converges when the conditionals are inconsistent (README, "The fixed point of the loss").

On a small enumerable problem this solves the stage-2 loss exactly, with f free on every partial assignment (infinite
capacity): the data-weighted least squares over all constraints f(x_S) + log p(x_j | x_S) = f(x_S + j) that stage 2 draws
(S a uniform-size prefix of a uniform order of a data row, j the next position), with f(empty) = 0 and the gradient
through the shorter prefix's f scaled by beta (`consistency_prefix_gradient`). It prints, per beta, how far the solution's
f(x) on complete rows lies from the order average T(x) = E_sigma log p_sigma(x): the standard deviation over rows
(data-weighted) and the mean, beside the spread of log p_sigma(x) over orders.

The conditionals are a consistent random model's, with N(0, noise^2) added to each conditional's logits (then
renormalised): noise 0 makes them consistent, and every beta then gives T exactly. With ``--checkpoint`` they are a
trained stage-1 network's instead, and the data are the empirical distribution of the ``--data`` array it was
trained on (a small D: the solve enumerates all (K+1)^D partial assignments).

    python scripts/fixed_point.py --positions 6 --noise 0.3 1.0
    python scripts/fixed_point.py --checkpoint RUN/checkpoints/last.pt --data tokens.npy
"""
from __future__ import annotations

import argparse
import itertools
import math

import numpy as np
import scipy.sparse
import scipy.sparse.linalg

MISSING = -1


class Problem:
    """K-ary data over D positions, and perturbed conditionals of a random consistent model, memoised per (x_S, j)."""

    def __init__(self, positions: int, classes: int, noise: float, seed: int):
        self.positions, self.classes, self.noise = positions, classes, noise
        self.rng = np.random.default_rng(seed)
        logits = self.rng.normal(size=(classes,) * positions) * 1.5
        self.model = np.exp(logits - logits.max())
        self.model /= self.model.sum()
        self.states = list(itertools.product(range(classes), repeat=positions))
        other = self.rng.dirichlet(np.full(len(self.states), 0.3))  # the data: half the model, half something else
        self.data = 0.5 * self.model.ravel() + 0.5 * other
        self._conditionals: dict = {}

    def key(self, observed: tuple, x: tuple) -> tuple:
        return tuple(x[i] if i in observed else MISSING for i in range(self.positions))

    def log_conditional(self, observed: tuple, x: tuple, position: int) -> float:
        key = (self.key(observed, x), position)
        if key not in self._conditionals:
            mass = np.zeros(self.classes)
            for state, p in zip(self.states, self.model.ravel()):
                if all(state[i] == x[i] for i in observed):
                    mass[state[position]] += p
            logits = np.log(mass) + self.noise * self.rng.normal(size=self.classes)
            self._conditionals[key] = logits - np.logaddexp.reduce(logits)
        return float(self._conditionals[key][x[position]])

    def order_average(self, x: tuple) -> tuple[float, float]:
        """T(x) = E_sigma log p_sigma(x) by the recursion T(S) = mean_{i in S} [T(S - i) + log p(x_i | x_{S - i})],
        and the standard deviation of log p_sigma(x) over all orders (D! of them; 720 random ones for D > 6)."""
        memo = {(): 0.0}

        def average(observed: tuple) -> float:
            if observed not in memo:
                memo[observed] = float(np.mean([average(tuple(k for k in observed if k != i))
                                                + self.log_conditional(tuple(k for k in observed if k != i), x, i)
                                                for i in observed]))
            return memo[observed]

        orders = (itertools.permutations(range(self.positions)) if self.positions <= 6 else
                  (tuple(np.random.default_rng(k).permutation(self.positions)) for k in range(720)))
        per_order = [sum(self.log_conditional(tuple(sorted(order[:t])), x, order[t]) for t in range(self.positions))
                     for order in orders]
        return average(tuple(range(self.positions))), float(np.std(per_order))


class TrainedProblem(Problem):
    """The conditionals of a stage-1 checkpoint (one batched pass over every partial assignment) and the empirical
    distribution of its training array."""

    def __init__(self, checkpoint: str, data: str):
        import torch

        from mamlib.stages.common import net_from_checkpoint

        net, _, _ = net_from_checkpoint(checkpoint, ("ao_arm",), None, torch.device("cpu"))
        net.eval()
        rows = np.load(data)
        self.positions, self.classes = net.num_positions, net.num_classes
        if rows.ndim != 2 or rows.shape[1] != self.positions or rows.min() < 0 or rows.max() >= self.classes:
            raise SystemExit(f"{data} must be a (N, {self.positions}) array of values 0..{self.classes - 1}, "
                             f"the data {checkpoint} was trained on")
        if (self.classes + 1) ** self.positions > 200_000:
            raise SystemExit(f"D={self.positions}, K={self.classes}: {(self.classes + 1) ** self.positions} partial "
                             "assignments are too many to solve exactly here; use D <= 8 for K = 3")
        self.states = list(itertools.product(range(self.classes), repeat=self.positions))
        codes = np.ravel_multi_index(tuple(rows.T), (self.classes,) * self.positions)
        self.data = np.bincount(codes, minlength=len(self.states)) / len(rows)
        keys = list(itertools.product(range(MISSING, self.classes), repeat=self.positions))
        values = torch.tensor([[max(value, 0) for value in key] for key in keys])
        with torch.no_grad():
            logits = net(values, values.new_tensor([[value != MISSING for value in key] for key in keys], dtype=torch.bool),
                         need_logits=True)[1]
        self._table = dict(zip(keys, torch.log_softmax(logits.double(), -1).numpy()))

    def log_conditional(self, observed: tuple, x: tuple, position: int) -> float:
        return float(self._table[self.key(observed, x)][position][x[position]])


def deviation_cells(problem: Problem, betas) -> tuple[float, list[str]]:
    """Data-weighted order spread, and per beta 'std / mean' of f(x) - T(x) over complete rows."""
    averages, spreads = zip(*(problem.order_average(x) for x in problem.states))
    weights = problem.data
    cells = []
    for beta in betas:
        deviation = np.where(weights > 0, solve(problem, beta) - np.array(averages), 0.0)
        mean = float(weights @ deviation)
        cells.append(f"{math.sqrt(weights @ (deviation - mean) ** 2):.3f} / {mean:+.3f}")
    return float(weights @ np.array(spreads)), cells


def solve(problem: Problem, beta: float) -> np.ndarray:
    """f(x) on every complete state at the loss's stationary point: sum_e w_e r_e (beta grad f(tail) - grad f(head)) = 0."""
    index: dict = {}

    def node(observed: tuple, x: tuple) -> int:
        return index.setdefault(problem.key(observed, x), len(index))

    D = problem.positions
    empty = node((), problem.states[0])
    edges = []
    for weight_x, x in zip(problem.data, problem.states):
        if weight_x == 0:  # rows the data never shows draw no constraints (their sets would have no equation)
            continue
        for size in range(D):
            for observed in itertools.combinations(range(D), size):
                for j in set(range(D)) - set(observed):  # P(prefix = S, next = j) = 1 / (D * C(D, |S|) * (D - |S|))
                    weight = weight_x / (D * math.comb(D, size) * (D - size))
                    edges.append((node(observed, x), node(tuple(sorted(observed + (j,))), x),
                                  problem.log_conditional(observed, x, j), weight))
    rows, cols, values = [empty], [empty], [1.0]
    target = np.zeros(len(index))
    for tail, head, log_p, weight in edges:  # residual = f(tail) + log_p - f(head)
        for row, sign in ((tail, beta), (head, -1.0)):
            if row != empty:
                rows += [row, row]
                cols += [tail, head]
                values += [weight * sign, -weight * sign]
                target[row] -= weight * sign * log_p
    matrix = scipy.sparse.csc_matrix((values, (rows, cols)), shape=(len(index), len(index)))
    f = scipy.sparse.linalg.spsolve(matrix, target)
    complete = [index.get(problem.key(tuple(range(D)), x)) for x in problem.states]
    return np.array([np.nan if at is None else f[at] for at in complete])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=5, help="D (the solve has (K+1)^D unknowns)")
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.3, 1.0])
    parser.add_argument("--betas", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", help="a stage-1 checkpoint: its conditionals instead of perturbed ones")
    parser.add_argument("--data", help="with --checkpoint: the .npy array it was trained on")
    args = parser.parse_args()
    if bool(args.checkpoint) != bool(args.data):
        parser.error("--checkpoint and --data go together")
    print("| D | conditionals | order spread of log p_sigma(x) | "
          + " | ".join(f"beta {b:g}: std / mean of f(x) - T(x)" for b in args.betas) + " |")
    print("|---" * (3 + len(args.betas)) + "|")
    if args.checkpoint:
        problem = TrainedProblem(args.checkpoint, args.data)
        spread, cells = deviation_cells(problem, args.betas)
        print(f"| {problem.positions} | {args.checkpoint} | {spread:.3f} | " + " | ".join(cells) + " |")
        return
    for noise in args.noise:
        problem = Problem(args.positions, args.classes, noise, args.seed)
        spread, cells = deviation_cells(problem, args.betas)
        print(f"| {args.positions} | noise {noise:g} | {spread:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""Using a trained model from Python: python docs/api_example.py <stage-2 checkpoint or exported folder> (or $MAM_MODEL)."""
import os
import sys

import mamlib

model = mamlib.load(sys.argv[1] if len(sys.argv) > 1 else os.environ["MAM_MODEL"])
print(model)                                   # what it is: kind, data, K, D, architecture, training steps
x = model.sample(4, seed=0)                    # (4, D) ints in 0..K-1
x[:, model.num_positions // 2:] = -1           # -1 = missing: keep the first half of each row
print("log p(x_S), one marginal pass: ", model.log_prob(x, method="marginal"))
print("log p(x_S), chain rule, 5 orders:", model.log_prob(x, method="chain", orders=5, seed=0))
print("infilled:\n", model.infill(x, seed=0))  # the observed half is kept exactly

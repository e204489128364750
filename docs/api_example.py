"""Using a trained model from Python: python docs/api_example.py <stage-2 checkpoint or exported folder> (or $MAM_MODEL)."""
import os
import sys

import numpy as np
import torch

import mamlib

model = mamlib.load(sys.argv[1] if len(sys.argv) > 1 else os.environ["MAM_MODEL"])  # or a Hub id; device="auto"
print(model)                                   # what it is: kind, data, K, D, architecture, training steps
x = model.sample(4, seed=0)                    # (4, D) ints in 0..K-1 (numpy; return_tensors="pt" for torch)
x[:, model.num_positions // 2:] = -1           # -1 = missing: keep the first half of each row
print("log p(x_S), one marginal pass: ", model.log_prob(x, method="marginal"))
print("log p(x_S), chain rule, 5 orders:", model.log_prob(x, method="chain", orders=5, seed=0))
given = np.zeros(x.shape, dtype=bool)
given[:, 0] = True                             # condition on position 0: log p(x_S without x_0 | x_0)
print("log p(rest | x_0), one pass:     ", model.log_prob(x, given=given, method="marginal"))
print("infilled:\n", model.infill(x, seed=0))  # the observed half is kept exactly

# torch in, torch out, with gradients: one maximum-likelihood step on the marginal network
batch = torch.from_numpy(model.sample(8, seed=1))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
loss = -model.log_prob(batch, method="marginal").mean()
loss.backward()
optimizer.step()
print(f"one gradient step, loss {loss.item():.3f} nats")

"""Run by test_trainer.py under torchrun with 2 CPU processes (gloo): a few data-parallel steps."""
import sys
from pathlib import Path

import torch

from mamlib.data.base import tensor_dataset
from mamlib.nets import Transformer
from mamlib.runtime import init_distributed, seed_everything, shutdown_distributed
from mamlib.stages.ao_arm import AOARMObjective
from mamlib.trainer import Trainer, epoch_batches, num_epoch_batches
from omegaconf import OmegaConf

out = Path(sys.argv[1])
torch.set_num_threads(1)
dist_info, device = init_distributed("cpu")
seed_everything(0, dist_info.rank)  # different init per rank: the trainer must broadcast rank 0's
net = Transformer(3, 6, d_model=16, num_layers=1, num_heads=2, mlp_dim=32)
data = tensor_dataset(torch.randint(0, 3, (64, 6), generator=torch.Generator().manual_seed(0)))
cfg = OmegaConf.create({"n_epochs": 5, "max_steps": 3, "batch_size": 8, "effective_batch": 16, "clip": 1.0, "log_every": 1})
trainer = Trainer(train_cfg=cfg, model=net, objective=AOARMObjective(net), optimizer=torch.optim.Adam(net.parameters(), 1e-2),
                  batches=lambda epoch, start: epoch_batches(data, 8, epoch, 0, dist_info, start),
                  batches_per_epoch=num_epoch_batches(data, 8, dist_info), run_dir=out / f"rank{dist_info.rank}",
                  device=device, dist_info=dist_info)
initial = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
trainer._broadcast_parameters()
broadcast = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
trainer.fit()
final = torch.cat([p.detach().flatten() for p in net.parameters()])
torch.save({"initial": initial, "broadcast": broadcast, "final": final, "steps": trainer.step, "world": dist_info.world_size},
           out / f"params_rank{dist_info.rank}.pt")
shutdown_distributed()

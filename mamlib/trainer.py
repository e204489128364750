"""One training loop for every stage: accumulation, clipping, data parallelism, bf16, checkpoints, resume, logging.

An *objective* supplies the per-batch loss; the trainer knows nothing about models beyond their parameters:
  objective.loss(batch) -> (scalar loss, {name: float}), or instead
  objective.loss_and_backward(batch, scale) -> (loss value, {name: float}) having backpropagated scale * loss itself
  (in pieces, to bound memory: the ARM baseline's D-pass chain rule)
  objective.on_epoch_start(epoch)        (e.g. re-seed a persistent sample buffer)
  objective.state_dict() / load_state_dict(state)   (buffers that resuming needs)
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from .checkpoint import check_same_arch, check_same_data, load_checkpoint, load_model_state, save_checkpoint
from .errors import ConfigError, TrainingDiverged
from .files import check_writable, pid_lock, stale_temp_files
from .progress import progress
from .runtime import DistInfo, autocast, resolve_precision, rng_state, set_rng_state

log = logging.getLogger("mamlib")


def epoch_batches(dataset, batch_size: int, epoch: int, seed: int, dist_info: DistInfo = DistInfo(), start_batch: int = 0,
                  shuffle: bool = True, drop_last: bool = True) -> Iterable[torch.Tensor]:
    """Deterministic batches for an epoch (a function of seed and epoch), sharded across processes.

    Deterministic so that resuming can skip exactly the batches already used.
    """
    generator = torch.Generator().manual_seed(int(seed) * 100_003 + epoch)
    indices = torch.randperm(len(dataset), generator=generator) if shuffle else torch.arange(len(dataset))
    indices = indices[dist_info.rank::dist_info.world_size]
    num_batches = len(indices) // batch_size if drop_last else math.ceil(len(indices) / batch_size)
    for batch_index in range(start_batch, num_batches):
        chunk = indices[batch_index * batch_size:(batch_index + 1) * batch_size].tolist()
        yield torch.stack(dataset.__getitems__(chunk) if hasattr(dataset, "__getitems__") else [dataset[i] for i in chunk])


def num_epoch_batches(dataset, batch_size: int, dist_info: DistInfo = DistInfo()) -> int:
    return (len(dataset) // dist_info.world_size) // batch_size


class Trainer:
    def __init__(self, *, train_cfg, model: torch.nn.Module, objective, optimizer: torch.optim.Optimizer,
                 batches: Callable[[int, int], Iterable], batches_per_epoch: int, run_dir, device: torch.device,
                 dist_info: DistInfo = DistInfo(), logger=None, checkpoint_meta: dict | None = None,
                 evaluate: Callable[[int], dict] | None = None, extra_parameters: list | None = None,
                 best_metric: str | None = None):
        self.cfg = train_cfg
        self.model, self.objective, self.optimizer = model, objective, optimizer
        self.batches, self.batches_per_epoch = batches, batches_per_epoch
        self.run_dir, self.device, self.dist = Path(run_dir), device, dist_info
        self.logger, self.meta, self.evaluate = logger, checkpoint_meta or {}, evaluate
        self.checkpoint_path = self.run_dir / "checkpoints" / "last.pt"
        self.bf16 = resolve_precision(train_cfg.get("precision", "fp32"), device) == "bf16"
        # best_metric: an evaluate() key to minimise; the step where it was lowest is kept as checkpoints/best.pt
        self.best_metric, self.best_value = best_metric, math.inf
        self.best_path = self.run_dir / "checkpoints" / "best.pt"
        per_step = train_cfg.batch_size * dist_info.world_size
        effective = train_cfg.get("effective_batch") or per_step
        self.accumulation = max(1, math.ceil(effective / per_step))
        self.step = self.epoch = self.batch_in_epoch = 0
        self.saved_step: int | None = None  # step of the last checkpoint written or resumed (the last good one)
        # extra_parameters: trained tensors that live outside the model (e.g. a learnable log Z)
        self.extra_parameters = list(extra_parameters or [])
        self.parameters = [p for p in model.parameters() if p.requires_grad] + self.extra_parameters
        if not self.parameters:
            raise ValueError("the model has no trainable parameters")
        # train.ema_decay: a moving average of the trained weights; checkpoints' "model" holds it (what eval, generate
        # and stage 2 load) and "training_weights" the raw ones (what resuming continues from)
        ema_decay = train_cfg.get("ema_decay")
        if ema_decay is not None and not 0 <= ema_decay < 1:
            raise ConfigError(f"train.ema_decay={ema_decay} is out of range: use a value in [0, 1), e.g. 0.99, or null")
        self.ema_decay = float(ema_decay or 0.0)
        self.ema = ({name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
                    if self.ema_decay else None)

    # -- checkpoints -------------------------------------------------------------------------------
    def save(self, path: Path | None = None) -> None:
        """The resumable state to ``path`` (default checkpoints/last.pt), refused when any weight is non-finite."""
        if not self.dist.is_main:
            return
        state = self.model.state_dict()
        bad = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
        bad += [f"{name} (moving average)" for name, tensor in (self.ema or {}).items() if not torch.isfinite(tensor).all()]
        bad += [f"extra parameter {i}" for i, p in enumerate(self.extra_parameters) if not torch.isfinite(p).all()]
        if bad:  # never replace the last good checkpoint by broken weights
            raise self.diverged(f"{len(bad)} weight tensor(s) became non-finite (first: {bad[0]})")
        weights, extra = state, {}
        if self.ema is not None:
            weights, extra = {**state, **self.ema}, {"training_weights": state, "ema_decay": self.ema_decay}
        save_checkpoint(path or self.checkpoint_path, {
            **self.meta, "model": weights, **extra, "optimizer": self.optimizer.state_dict(),
            "objective": self.objective.state_dict(), "step": self.step, "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch, "rng": rng_state(), "best_value": self.best_value})
        if path is None:
            self.saved_step = self.step

    def diverged(self, what: str, parts: dict | None = None) -> TrainingDiverged:
        """The one-line report of a non-finite loss, gradient or weight: where, which term, what is kept."""
        terms = [f"{name}={float(value)}" for name, value in (parts or {}).items() if not math.isfinite(float(value))]
        term_text = f" (non-finite term: {', '.join(terms)})" if terms else ""
        kept = (f"the last good checkpoint (step {self.saved_step}) stays at {self.checkpoint_path}"
                if self.saved_step is not None else "no checkpoint was written")
        lr = self.cfg.get("lr")
        return TrainingDiverged(f"training diverged at step {self.step + 1}: {what}{term_text}; {kept}; "
                                f"lower train.lr{f' (now {lr})' if lr is not None else ''} or set train.clip")

    def run(self, resume: bool = False, overwrite: bool = False) -> int:
        """``fit()`` guarded: a writable run dir, one live run per run dir, no silent overwrite of a checkpoint."""
        folder = self.checkpoint_path.parent
        if self.checkpoint_path.exists() and not resume and not overwrite:
            raise ConfigError(f"{self.checkpoint_path} already holds a checkpoint; continue it with resume=true, "
                              "or start over with overwrite=true (or choose another hydra.run.dir)")
        if not self.dist.is_main:
            if resume:
                self.resume()
            return self.fit()
        check_writable(folder)  # before any training, so that no work is lost at the first save
        with pid_lock(folder / ".lock", f"run dir {self.run_dir}"):
            for stale in stale_temp_files(self.checkpoint_path):  # left by a kill during a save
                stale.unlink(missing_ok=True)
                log.info("removed the stale temporary file %s", stale)
            if resume:
                self.resume()
            return self.fit()

    def resume(self, path=None) -> bool:
        path = Path(path) if path else self.checkpoint_path
        if not path.exists():
            log.info("resume requested but %s does not exist: starting from scratch", path)
            return False
        state = load_checkpoint(path, expected_kind=self.meta.get("kind"))
        if "dataset" in self.meta:
            check_same_data(state.get("dataset") or {}, self.meta["dataset"], path)
        if "arch" in self.meta:
            check_same_arch(state.get("arch") or {}, self.meta["arch"], path)
        load_model_state(self.model, state.get("training_weights", state["model"]), path)
        if self.ema is not None:  # a checkpoint without an average (no "training_weights") starts it at its weights
            for name, tensor in self.ema.items():
                tensor.copy_(state["model"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.objective.load_state_dict(state["objective"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        set_rng_state(state["rng"])
        self.best_value = float(state.get("best_value", math.inf))  # best.pt is replaced only by a better evaluation
        self.saved_step = self.step
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch, self.batch_in_epoch)
        return True

    # -- training ----------------------------------------------------------------------------------
    def total_steps(self) -> int:
        steps = self.cfg.n_epochs * (self.batches_per_epoch // self.accumulation)
        max_steps = self.cfg.get("max_steps")
        return min(steps, max_steps) if max_steps else steps

    def _sync_gradients(self) -> None:
        if not self.dist.enabled:
            return
        for parameter in self.parameters:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            dist.all_reduce(parameter.grad)
            parameter.grad /= self.dist.world_size

    def _broadcast_parameters(self) -> None:
        if self.dist.enabled:
            for tensor in list(self.model.parameters()) + list(self.model.buffers()):
                dist.broadcast(tensor.data, src=0)

    def learning_rate_factor(self, total: int, deadline: float, budget_seconds: float) -> float:
        """``train.lr_schedule``: constant (the paper's) or cosine decay to 0 over the run after a linear warmup.

        Progress is the larger of the step fraction and the elapsed fraction of ``train.max_minutes``, so a
        time-budgeted run also ends its decay when its time is up.
        """
        schedule, warmup = self.cfg.get("lr_schedule", "constant"), self.cfg.get("warmup_steps") or 0
        if schedule not in ("constant", "cosine"):
            raise ValueError(f"train.lr_schedule={schedule!r} is unknown; use constant or cosine")
        factor = min(1.0, (self.step + 1) / warmup) if warmup else 1.0
        if schedule == "cosine":
            progress = self.step / max(total, 1)
            if budget_seconds:
                progress = max(progress, 1.0 - (deadline - time.monotonic()) / budget_seconds)
            factor *= 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return factor

    def optimizer_step(self, lr_factor: float = 1.0) -> float:
        self._sync_gradients()
        clip = self.cfg.get("clip")
        norm = float(torch.nn.utils.clip_grad_norm_(self.parameters, clip if clip and clip > 0 else float("inf")))
        if not math.isfinite(norm):  # after the all-reduce, so every process stops at the same step
            raise self.diverged(f"the gradient norm is {norm}")
        for group in self.optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
            group["lr"] = group["base_lr"] * lr_factor
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.update_ema()
        return norm

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema <- d * ema + (1 - d) * weights, with d = min(ema_decay, (1 + step) / (10 + step)) so that the average
        forgets the initial weights within the first steps (short CPU runs are a few hundred steps)."""
        if self.ema is None:
            return
        decay = min(self.ema_decay, (1 + self.step) / (10 + self.step))
        for name, parameter in self.model.named_parameters():
            if name in self.ema:
                self.ema[name].lerp_(parameter.detach(), 1.0 - decay)

    @contextlib.contextmanager
    def averaged_weights(self):
        """The model holds the moving-average weights inside the block (evaluation), its own ones again after it."""
        if self.ema is None:
            yield
            return
        parameters = dict(self.model.named_parameters())
        kept = {name: parameters[name].detach().clone() for name in self.ema}
        with torch.no_grad():
            for name, tensor in self.ema.items():
                parameters[name].copy_(tensor)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, tensor in kept.items():
                    parameters[name].copy_(tensor)

    def fit(self) -> int:
        self._broadcast_parameters()
        total = self.total_steps()
        if self.batches_per_epoch < self.accumulation:
            raise ValueError(f"an epoch has {self.batches_per_epoch} batches but one optimizer step needs {self.accumulation}; "
                             "lower train.effective_batch or train.batch_size")
        bar = progress(total=total, initial=self.step, desc="train", disable=not self.dist.is_main, dynamic_ncols=True)
        try:  # the bar ends its line even when training stops with an error
            running, micro, log_every = defaultdict(float), 0, self.cfg.get("log_every", 50)
            ckpt_every, eval_every = self.cfg.get("checkpoint_every"), self.cfg.get("eval_every")
            max_minutes = self.cfg.get("max_minutes")
            budget_seconds = 60 * max_minutes if max_minutes else 0.0
            deadline = time.monotonic() + budget_seconds if max_minutes else float("inf")
            if self.cfg.get("eval_at_start") and self.step == 0 and self.evaluate and self.dist.is_main:
                self.run_evaluation()  # the starting point of the validation curves
            self.model.train()
            piecewise = getattr(self.objective, "loss_and_backward", None)  # objectives that backpropagate in pieces
            while self.epoch < self.cfg.n_epochs and self.step < total:
                if self.batch_in_epoch == 0:
                    self.objective.on_epoch_start(self.epoch)
                usable = (self.batches_per_epoch // self.accumulation) * self.accumulation
                for batch in self.batches(self.epoch, self.batch_in_epoch):
                    if self.batch_in_epoch >= usable or self.step >= total:
                        break
                    if torch.is_tensor(batch):
                        batch = batch.to(self.device, non_blocking=True)
                    with autocast(self.device, self.bf16):
                        if piecewise:
                            loss_value, metrics = piecewise(batch, 1.0 / self.accumulation)
                        else:
                            loss, metrics = self.objective.loss(batch)
                            loss_value = loss.item()
                    if not math.isfinite(loss_value):  # before any optimizer step: no non-finite weights are saved
                        raise self.diverged(f"the loss is {loss_value}", metrics)
                    if not piecewise:
                        (loss / self.accumulation).backward()
                    running["loss"] += loss_value
                    for key, value in metrics.items():
                        running[key] += float(value)
                    running["_count"] += 1
                    micro += 1
                    self.batch_in_epoch += 1
                    if micro < self.accumulation:
                        continue
                    micro = 0
                    lr_factor = self.learning_rate_factor(total, deadline, budget_seconds)
                    running["grad_norm"] += self.optimizer_step(lr_factor) * self.accumulation  # per micro-batch, as the losses
                    running["lr_factor"] += lr_factor * self.accumulation
                    bar.update(1)
                    if self.step % log_every == 0 or self.step == total:
                        count = running.pop("_count")
                        averaged = {f"train/{k}": v / count for k, v in running.items()}
                        bar.set_postfix(loss=f"{averaged['train/loss']:.4g}", refresh=False)  # drawn at the bar's next update
                        if self.logger and self.dist.is_main:
                            self.logger.log({**averaged, "epoch": self.epoch}, self.step)
                        running = defaultdict(float)
                    if ckpt_every and self.step % ckpt_every == 0:
                        self.save()
                    if eval_every and self.evaluate and self.step % eval_every == 0 and self.dist.is_main:
                        self.run_evaluation()
                    if time.monotonic() > deadline:  # wall-clock budget (train.max_minutes); every rank checks its own clock
                        log.info("train.max_minutes=%s reached at step %d", max_minutes, self.step)
                        total = self.step
                if self.batch_in_epoch >= usable:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        finally:
            bar.close()
        self.save()
        return self.step

    def run_evaluation(self) -> None:
        self.model.eval()
        with torch.no_grad(), self.averaged_weights():
            metrics = self.evaluate(self.step)
        self.model.train()
        if self.logger and metrics:
            self.logger.log({f"val/{k}": v for k, v in metrics.items()}, self.step)
        log.info("step %d: %s", self.step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
        value = (metrics or {}).get(self.best_metric) if self.best_metric else None
        if value is not None and math.isfinite(value) and value < self.best_value:
            self.best_value = float(value)
            self.save(self.best_path)
            log.info("step %d: best %s so far (%.4g), saved %s", self.step, self.best_metric, value, self.best_path)

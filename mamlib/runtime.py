"""Device, seeding, distributed setup, precision and compilation: the one place that knows about accelerators."""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

ACCELERATOR = "cuda"  # the only spelling of the accelerator backend in the project


def select_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` picks the accelerator when present, else the CPU; ``cpu`` or ``cuda[:i]`` force one."""
    if name == "auto":
        name = ACCELERATOR if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == ACCELERATOR:
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={name} requested but no {ACCELERATOR} device is available; use device=cpu or device=auto")
        if device.index is None:
            device = torch.device(ACCELERATOR, local_rank)
        torch.cuda.set_device(device)
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (for honest timings)."""
    if device.type == ACCELERATOR:
        torch.cuda.synchronize(device)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on GPU); single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    device = select_device(device_name, info.local_rank)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == ACCELERATOR else "gloo")
    return info, device


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch; each rank gets its own stream."""
    seed = int(seed) + 1000 * rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded(seed, device: torch.device):
    """Run the block with torch's generators seeded, restoring them afterwards; ``seed=None`` leaves them alone."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == ACCELERATOR else []):
        torch.manual_seed(int(seed))
        yield


def rng_state() -> dict:
    """Every generator's state as tensors and plain values (checkpoints hold nothing else)."""
    version, words, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state[ACCELERATOR] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    python, numpy_state = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if ACCELERATOR in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state[ACCELERATOR])


def fast_bf16(device: torch.device) -> bool:
    """Whether this device runs bf16 convolutions and matrix products faster than fp32: CPUs with AMX or AVX-512 BF16
    (measured with AMX: training steps 1.2-2.0x, exact likelihood 1.8-2.7x; README "bf16 passes"), accelerators that
    support bf16."""
    if device.type == "cpu":
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private but stable since torch 2.1
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    if device.type == ACCELERATOR:
        return torch.cuda.is_bf16_supported()
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision`` / ``eval.precision``: fp32, bf16, or auto (bf16 where :func:`fast_bf16`, else fp32)."""
    if precision == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    return precision


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast when enabled (off on CPU by default); a no-op context otherwise."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def maybe_compile(module: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    return torch.compile(module) if enabled else module


def default_data_dir() -> str:
    """``$MAM_DATA_DIR`` or the repository's ``data/`` folder, independent of the working directory."""
    env = os.environ.get("MAM_DATA_DIR")
    if env:
        return env
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")

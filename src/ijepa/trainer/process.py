"""Process-wide settings of a run (threads, determinism, global RNG seeds), restored afterwards
so that an in-process run leaves the caller's process as it found it."""
from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from ijepa import checkpoint as ckpt
from ijepa.distributed import DistInfo
from ijepa.train_config import PretrainConfig

__all__ = ["process_settings", "seed_everything"]


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2 ** 32))
    random.seed(seed)


@contextlib.contextmanager
def process_settings(cfg: PretrainConfig, dist_info: DistInfo):
    old_rng = ckpt.rng_state()
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_bench = torch.backends.cudnn.benchmark
    try:
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        elif dist_info.world_size > 1 and dist_info.device.type == "cpu":
            # several processes on one machine share its cores
            local = int(os.environ.get("LOCAL_WORLD_SIZE", dist_info.world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        yield
    finally:
        ckpt.set_rng_state(old_rng)
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)
        torch.backends.cudnn.benchmark = old_bench

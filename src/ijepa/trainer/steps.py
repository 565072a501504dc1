"""One optimiser step of `ijepa.trainer.loop.Trainer`: data, masks, accumulated forward/backward
passes, AdamW, the method's after-step. Nothing here reads a device value to the host: the
loss goes to the trainer's `LossWindow`, the grad norm and collapse signals of a log step stay
tensors until `read_stats` (called by the loop at log steps only)."""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from ijepa import fsdp
from ijepa.masks import Masks, make_generator
from ijepa.monitor import collapse_stats
from ijepa.trainer.compiling import mark_mask_dims_dynamic
from ijepa.trainer.optim import apply_schedules, grad_norm

__all__ = ["StepMixin", "mask_rows"]


def mask_rows(m: Masks, lo: int, hi: int) -> Masks:
    """Rows [lo, hi) of a batch's masks (the batch dimension is 1 in every list)."""
    return Masks(context=m.context[:, lo:hi], targets=m.targets[:, lo:hi], grid=m.grid, target_hw=m.target_hw,
                 context_hw=m.context_hw, context_counts=m.context_counts[:, lo:hi],
                 context_valid=None if m.context_valid is None else m.context_valid[:, lo:hi])


class StepMixin:
    # -- inputs ------------------------------------------------------------------------
    def next_batch(self, step: int) -> tuple[torch.Tensor, Masks | None]:
        """data + masks: this rank's (images float [0, 1], masks) of global iteration `step` on the
        device, from the loader workers (ijepa.train_input), which prepare the next steps meanwhile."""
        if self._data_iter is None or self._data_next != step:  # first call, or a jump
            self._data_iter = self.input.batches(step, self.total_steps)
        images, masks = next(self._data_iter)
        self._data_next = step + 1
        self.batches_seen += 1
        return self.input.to_device(images, masks)

    def next_images(self, step: int) -> torch.Tensor:
        return self.next_batch(step)[0]

    def masks_for(self, step: int) -> Masks:
        """masks: the global batch's masks from (seed, step); this rank's rows."""
        m = self.method.masks(self.global_batch, make_generator(self.cfg.seed, step))
        if self.dist.world_size > 1:
            m = mask_rows(m, self.dist.rank * self.local_batch, (self.dist.rank + 1) * self.local_batch)
        return self._to_device(m)

    def _to_device(self, m: Masks) -> Masks:
        if m.context.device == self.device:
            return m
        if self.device.type == "cuda":
            m = m.pin_memory()
        return m.to(self.device, non_blocking=True)

    # -- the step ----------------------------------------------------------------------
    def _sync_context(self, last: bool):
        """Gradients are reduced across ranks only in the last pass of a step."""
        if last or not self.dist.distributed:
            return contextlib.nullcontext()
        if self.sharded:
            fsdp.set_gradient_sync(self.method.trained, False)
            return contextlib.nullcontext()
        ddp = getattr(self.train_module, "_orig_mod", self.train_module)  # compiled: the DDP inside
        return ddp.no_sync() if hasattr(ddp, "no_sync") else contextlib.nullcontext()

    def train_step(self, step: int, images: torch.Tensor | None = None, masks: Masks | None = None
                   ) -> dict[str, Any]:
        """One optimiser step over this rank's batch. `images` (float [0, 1], on the device)
        and `masks` (this rank's rows) replace the data step, e.g. to time the step alone.
        Returns the step's statistics; "loss" is a 0-d tensor on the device (mean over this
        rank's passes), "grad_norm" and the collapse signals (log steps only) tensors too."""
        want_log = self._is_log_step(step + 1)
        if images is None:
            images, masks = self.next_batch(step)
        masks = self.masks_for(step) if masks is None else self._to_device(masks)
        values = self.schedules.step()
        apply_schedules(self.optimizer, values["lr"], values["weight_decay"])
        self.optimizer.zero_grad(set_to_none=True)
        a, b = self.accum_steps, images.shape[0]
        if b % a:
            raise ValueError(f"a batch of {b} images cannot be split into accum_steps={a} equal passes")
        size = b // a
        loss_sum, pooled = None, []
        for i in range(a):
            last = i == a - 1
            x = images if a == 1 else images[i * size:(i + 1) * size]
            m = masks if a == 1 else mask_rows(masks, i * size, (i + 1) * size)
            if self.compiled:
                mark_mask_dims_dynamic(m)
            if self.sharded and last and a > 1:
                fsdp.set_gradient_sync(self.method.trained, True)
            with self._sync_context(last):
                loss, h = self.method.loss(self.train_module, x, m, self.autocast)
                (loss if a == 1 else loss / a).backward()
            part = loss.detach().float() if a == 1 else loss.detach().float() / a
            loss_sum = part if loss_sum is None else loss_sum + part
            if want_log:
                pooled.append(h.detach().float().mean(dim=1) if h.ndim == 3 else h.detach().float())
        norm = self._grad_norm(want_log)
        self.optimizer.step()
        self.method.after_step(values["momentum"])
        self.step = step + 1
        self.losses.append(step, loss_sum)
        out = {"loss": loss_sum, "grad_norm": norm, "context_tokens": masks.context.shape[-1], **values}
        if want_log:
            out["features"] = pooled[0] if len(pooled) == 1 else torch.cat(pooled)
        return out

    def _grad_norm(self, want: bool) -> torch.Tensor | None:
        clip = self.cfg.optimisation.grad_clip
        if clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.trained_params, clip)
            return norm.full_tensor() if fsdp.is_dtensor(norm) else norm
        if not want:
            return None
        if self.sharded:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.trained_params if p.grad is not None])
            return norm.full_tensor() if fsdp.is_dtensor(norm) else norm
        return grad_norm(self.trained_params)

    def read_stats(self, stats: dict[str, Any]) -> dict[str, Any]:
        """A log step's statistics as host numbers (the host syncs of a log step)."""
        out = {k: v for k, v in stats.items() if k not in ("features", "loss")}
        norm = stats.get("grad_norm")
        out["grad_norm"] = None if norm is None else float(norm)
        if stats.get("features") is not None:
            out.update(collapse_stats(stats["features"]))
        return out

    def flush_losses(self) -> None:
        """Read the losses since the last read (all ranks, same steps) into the log window;
        NonFiniteLossError at the first NaN/inf."""
        values = self.losses.read(self._non_finite_message)
        self.logbook.add_losses(values)

    def _non_finite_message(self, step: int, value: float) -> str:
        from ijepa import checkpoint as ckpt

        last = self.last_checkpoint or ckpt.latest_checkpoint(self.ckpt_dir)
        return (f"loss is {value} at step {step + 1} of {self.total_steps} (epoch {step // self.steps_per_epoch}); "
                f"stopped at step {self.step} (losses are read every log_every={self.cfg.log_every} steps and "
                f"before every checkpoint), no checkpoint written after it. Last good checkpoint: "
                f"{last if last else 'none'}. Lower optimisation.lr, check the data, or try precision 'fp32'.")

"""Mixed precision of the training forward pass (``train.autocast``): :class:`Precision`.

    precision = Precision(recipe.train.autocast, device, recipe.source)
    with precision.autocast():
        loss = model(input_ids, targets).loss
    precision.backward(loss)
    precision.unscale(optimizers)      # before clipping
    precision.step(optimizers)         # skips a float16 step with inf/NaN gradients
"""

from __future__ import annotations

import contextlib

import torch

from .config import RecipeError

AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # train.autocast


class Precision:
    """``train.autocast``: the dtype the training forward runs in, and the GradScaler float16 needs.

    ``none``: everything float32, as without this setting. ``bf16`` / ``fp16``: the training forward runs
    under ``torch.autocast(device_type, dtype)``, so matmuls, linear and convolution layers and attention run
    in bfloat16 / float16 while autocast keeps norms, softmax and reductions in float32; the engine computes
    the loss on float32 logits (the loss is float32) and the fast-weight recurrence in float32. Parameters,
    gradients and optimizer states stay float32 (autocast casts copies, not the weights), the backward pass
    and the optimizer step run outside autocast, and evaluation runs in float32. ``bf16`` runs on a CPU and
    on CUDA devices that support bfloat16; ``fp16`` runs on CUDA only, with a ``torch.amp.GradScaler``
    (loss scaled before backward, gradients unscaled before clipping, steps with inf/NaN gradients skipped),
    whose state the checkpoints keep.
    """

    def __init__(self, mode: str, device: torch.device, source: str = "<recipe>"):
        if mode not in AUTOCAST_DTYPES:
            raise RecipeError(f"{source}: train.autocast: {mode!r} is not allowed; allowed: "
                              f"{', '.join(AUTOCAST_DTYPES)}")
        if mode == "fp16" and device.type != "cuda":
            raise RecipeError(f"{source}: train.autocast: 'fp16' needs a CUDA device (train.device is "
                              f"{str(device)!r}): float16 training needs a GradScaler, which sleepzoo runs on "
                              f"CUDA only; use train.autocast=bf16 on a CPU")
        if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise RecipeError(f"{source}: train.autocast: 'bf16' is not supported by "
                              f"{torch.cuda.get_device_name(device)}; use train.autocast=fp16 or none")
        self.mode, self.device = mode, device
        self.dtype = AUTOCAST_DTYPES[mode]
        self.scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """Bring scaled gradients back to their true size (before clipping)."""
        if self.scaler is not None:
            for opt in optimizers:
                self.scaler.unscale_(opt)

    def step(self, optimizers: list[torch.optim.Optimizer]) -> None:
        if self.scaler is None:
            for opt in optimizers:
                opt.step()
            return
        for opt in optimizers:
            self.scaler.step(opt)
        self.scaler.update()

    def state_dict(self) -> dict:
        return {} if self.scaler is None else {"grad_scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        saved = state.pop("grad_scaler", None)
        if self.scaler is not None and saved is not None:
            self.scaler.load_state_dict(saved)

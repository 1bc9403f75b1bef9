"""Exponential moving average of weights (the paper's EMA 0.999–0.9999)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor


class EMA:
    """Shadow copies of a module's floating-point parameters and buffers, updated in place:
    ``θ̄ ← θ̄ + (1 − d)(θ − θ̄)`` with ``d = min(decay, (1 + n) / (10 + n))`` (a warm-up, so early averages are not
    dominated by the random initialisation).

    The shadows are float32 whatever the module's dtype. Of a sharded module (FSDP2: its state holds DTensors)
    they are DTensors with the same placements, and every update and copy works on the local shards alone: no
    communication, and no process ever holds more than its share."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}

    def current_decay(self) -> float:
        """The decay used by the next update."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the averages towards ``model``'s current weights."""
        weight = 1.0 - self.current_decay()
        state = model.state_dict()
        keys = list(self.shadow)
        torch._foreach_lerp_([_local(self.shadow[k]) for k in keys], [_local(state[k]).detach().float() for k in keys],
                             weight)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (cast to its dtypes)."""
        state = model.state_dict()
        for k, v in self.shadow.items():
            _local(state[k]).copy_(_local(v))

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged weights (same keys as the model's state dict)."""
        return dict(self.shadow)

    def load_state_dict(self, tensors: dict[str, Tensor], num_updates: int) -> None:
        """Restore averaged weights saved by :meth:`state_dict`."""
        missing = set(self.shadow) - set(tensors)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}...")
        for k in self.shadow:
            self.shadow[k].copy_(tensors[k])
        self.num_updates = num_updates


def _local(tensor: Tensor) -> Tensor:
    """This process's shard of a sharded (DTensor) weight, sharing its storage; any other tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor

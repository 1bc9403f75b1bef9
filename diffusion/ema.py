"""Exponential moving average of weights (the paper's EMA 0.999–0.9999)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor


class EMA:
    """Shadow copies of a module's floating-point parameters and buffers, updated in place:
    ``θ̄ ← θ̄ + (1 − d)(θ − θ̄)`` with ``d = min(decay, (1 + n) / (10 + n))`` (a warm-up, so early averages are not
    dominated by the random initialisation).

    The shadows are float32 whatever the module's dtype. Of a sharded module (FSDP2: its state holds DTensors)
    they are DTensors with the same placements, and every update and copy works on the local shards alone: no
    communication, and no process ever holds more than its share. The update count ``n`` lives on the weights'
    device beside the averages, so an update that depends on whether the optimiser step happened (``taken``) needs
    no value read back on the host."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay, self.warmup = decay, warmup
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}
        device = next(iter(self.shadow.values())).device if self.shadow else torch.device("cpu")
        self._count = torch.zeros((), dtype=torch.float64, device=device)  # n: updates so far

    @property
    def num_updates(self) -> int:
        """Updates so far (a host read: for checkpoints)."""
        return int(self._count.item())

    @num_updates.setter
    def num_updates(self, count: int) -> None:
        self._count.fill_(count)

    def _decay(self) -> Tensor:
        """The decay the next update uses, on the device: ``[]`` float64."""
        if not self.warmup:
            return torch.full_like(self._count, self.decay)
        return ((1 + self._count) / (10 + self._count)).clamp(max=self.decay)

    def current_decay(self) -> float:
        """The decay used by the next update."""
        return float(self._decay())

    @torch.no_grad()
    def update(self, model: nn.Module, taken: Optional[Tensor] = None) -> None:
        """Move the averages towards ``model``'s current weights. ``taken`` (a bool tensor on the weights' device):
        whether the optimiser step happened; a skipped step changes neither the averages nor the count."""
        weight = 1.0 - self._decay()
        if taken is not None:
            weight = weight * taken
        state = model.state_dict()
        keys = list(self.shadow)
        shadow = [_local(self.shadow[k]) for k in keys]
        step = torch._foreach_sub([_local(state[k]).detach().float() for k in keys], shadow)  # θ − θ̄
        torch._foreach_mul_(step, weight.float())
        torch._foreach_add_(shadow, step)
        self._count += 1 if taken is None else taken

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
        self._count.fill_(num_updates)


def _local(tensor: Tensor) -> Tensor:
    """This process's shard of a sharded (DTensor) weight, sharing its storage; any other tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor

"""`APTLinear`: a frozen Linear with a LoRA-style adapter whose rank can grow and whose rows/columns
can be removed physically (docs/method.md section 2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from apt_lightning.structure.slicing import SliceOp


class APTLinear(nn.Linear):
    """y = x W^T + b + s * dropout(x) A^T B^T with W, b frozen; A (r x in), B (out x r), s = alpha / r0.

    Subclasses `nn.Linear` so the state-dict keys `weight` / `bias` stay those of the wrapped layer and
    code that slices Linears handles adapters too. The scaling `s` is fixed at creation: rank growth
    keeps it (docs/method.md section 2), so growing never changes the output.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if rank < 1:
            raise ValueError(f"adapter rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"adapter dropout must be in [0, 1), got {dropout}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0
    ) -> APTLinear:
        """Wrap `linear`, sharing (not copying) its weight and bias."""
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            device=w.device,
            dtype=w.dtype,
        )
        layer.weight = nn.Parameter(w.data, requires_grad=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        return layer

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out + self.scaling * F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)

    def grow_rank(self, new_rank: int, generator: torch.Generator | None = None) -> None:
        """Append random rows to A and zero columns to B: the output is unchanged, and the new A rows get
        gradients as soon as B moves off zero (and the new B columns get gradients at once).

        `generator` (a CPU generator) draws the new rows in float32 on the CPU, then they move to A's device
        and dtype: the rows depend on the generator's state only, not on the global RNG or the device, so a
        resumed run that restores the generator grows the same rows (`AdaptiveTuning` does this). Without
        it the rows come from the global RNG on A's device."""
        if new_rank < self.rank:
            raise ValueError(f"grow_rank: new rank {new_rank} is below the current rank {self.rank}")
        if new_rank == self.rank:
            return
        extra = new_rank - self.rank
        if generator is None:
            a_new = torch.empty(extra, self.in_features, device=self.lora_A.device, dtype=self.lora_A.dtype)
            nn.init.kaiming_uniform_(a_new, a=math.sqrt(5))
        else:
            a_new = torch.empty(extra, self.in_features)
            nn.init.kaiming_uniform_(a_new, a=math.sqrt(5), generator=generator)
            a_new = a_new.to(self.lora_A.device, self.lora_A.dtype)
        b_new = torch.zeros(self.out_features, extra, device=self.lora_B.device, dtype=self.lora_B.dtype)
        self.lora_A = nn.Parameter(torch.cat([self.lora_A.data, a_new], 0))
        self.lora_B = nn.Parameter(torch.cat([self.lora_B.data, b_new], 1))

    def slice_ops(self, out_index: torch.Tensor | None, in_index: torch.Tensor | None) -> list[SliceOp]:
        ops = []
        if out_index is not None:
            ops += [SliceOp("weight", 0, out_index), SliceOp("lora_B", 0, out_index)]
            if self.bias is not None:
                ops.append(SliceOp("bias", 0, out_index))
        if in_index is not None:
            ops += [SliceOp("weight", 1, in_index), SliceOp("lora_A", 1, in_index)]
        return ops

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * self.lora_B @ self.lora_A

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain Linear with W + s B A: same outputs, no adapter cost at inference."""
        merged = nn.Linear(
            self.in_features,
            self.out_features,
            self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        merged.weight.copy_(self.weight + self.delta_weight().to(self.weight.dtype))
        if self.bias is not None:
            merged.bias.copy_(self.bias)
        return merged

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"

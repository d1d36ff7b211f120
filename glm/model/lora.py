"""LoRA: y = x W^T + b + (alpha / r) * dropout(x) A^T B^T on the linears whose name matches a regex.

The wrapped linear keeps its parameter names (`...query_key_value.weight`), so a base checkpoint
loads unchanged; the adapter adds `...query_key_value.lora_a` [r, in] and `.lora_b` [out, r].
B starts at zero, so a fresh adapter leaves the model's output unchanged.
"""

from __future__ import annotations

import math
import re

from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import HeUniform, initializer

from glm import GLMError
from glm.model.layers import Linear
from glm.runtime import ms


class LoRALinear(Linear):
    def __init__(self, base: Linear, rank: int, alpha: float, dropout: float):
        nn.Cell.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.has_bias = base.has_bias
        if base.has_bias:
            self.bias = base.bias
        self.compute_dtype = base.compute_dtype
        self.matmul = base.matmul
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_a = Parameter(initializer(HeUniform(negative_slope=math.sqrt(5)), (rank, self.in_features),
                                            ms.float32), name="lora_a")
        self.lora_b = Parameter(initializer("zeros", (self.out_features, rank), ms.float32), name="lora_b")
        self.lora_dropout = nn.Dropout(p=dropout) if dropout > 0 else None
        # With dropout on x the adapter cannot be folded into W while training (merged_weight is then
        # exact only in eval mode).
        self.mergeable = self.lora_dropout is None

    def construct(self, x: Tensor) -> Tensor:
        y = super().construct(x)
        h = x if self.lora_dropout is None else self.lora_dropout(x)
        shape = h.shape
        h = h.reshape(-1, shape[-1]).astype(self.compute_dtype)
        a = self.lora_a.astype(self.compute_dtype)
        b = self.lora_b.astype(self.compute_dtype)
        delta = self.matmul(self.matmul(h, a), b) * self.scaling
        return y + delta.reshape(shape[:-1] + (self.out_features,))

    def merged_weight(self) -> Tensor:
        """W + scaling * B A in the compute dtype (x W^T + scaling * (x A^T) B^T = x (W + scaling B A)^T)."""
        delta = ops.matmul(self.lora_b.astype(self.compute_dtype), self.lora_a.astype(self.compute_dtype))
        return self.weight.astype(self.compute_dtype) + delta * self.scaling


LORA_KEYS = ("pet_type", "lora_rank", "lora_alpha", "lora_dropout", "target_modules")


def lora_settings(pet_config: dict | None) -> dict | None:
    """The LoRA hyper-parameters of a pet_config the loader validated (glm/settings.py PetConfig: the keys'
    defaults and checks live there), or None when it asks for no LoRA."""
    if not pet_config or pet_config.get("pet_type") != "lora":
        return None
    return {k: pet_config[k] for k in LORA_KEYS}


def apply_lora(model: nn.Cell, settings: dict) -> list[str]:
    """Swap matching `Linear`s for `LoRALinear`s, freeze everything else; return the wrapped names."""
    pattern = re.compile(settings["target_modules"])
    targets = [(name, cell) for name, cell in model.cells_and_names()
               if isinstance(cell, Linear) and not isinstance(cell, LoRALinear) and name
               and (pattern.fullmatch(name) or pattern.fullmatch(name.split(".")[-1]))]
    if not targets:
        raise GLMError(f"model.model_config.pet_config.target_modules: {settings['target_modules']!r} "
                       "matches no linear layer (e.g. 'query_key_value', 'dense', 'dense_h_to_4h')")
    for p in model.get_parameters():
        p.requires_grad = False
    for name, cell in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = _sub_cell(model, parent_name)
        lora = LoRALinear(cell, settings["lora_rank"], settings["lora_alpha"], settings["lora_dropout"])
        setattr(parent, attr, lora)
        # Attaching a cell after construction renames its parameters relative to itself; restore
        # the full paths so checkpoints (and graph compilation) see unique, unchanged names.
        for p in lora.get_parameters(expand=False):
            p.name = f"{name}.{p.name.rsplit('.', 1)[-1]}"
    return [n for n, _ in targets]


def _sub_cell(model: nn.Cell, path: str) -> nn.Cell:
    cell = model
    for part in path.split("."):
        cell = getattr(cell, part) if not part.isdigit() else cell[int(part)]
    return cell


def merge_lora_state(state: dict, settings: dict) -> dict:
    """Fold `lora_a/lora_b` pairs of a numpy state dict into their base weights; drop the adapters."""
    scaling = settings["lora_alpha"] / settings["lora_rank"]
    out = {k: v for k, v in state.items() if not k.endswith((".lora_a", ".lora_b"))}
    for key in [k for k in state if k.endswith(".lora_a")]:
        base = key[: -len(".lora_a")]
        a, b = state[key], state[base + ".lora_b"]
        w = out[base + ".weight"]
        out[base + ".weight"] = (w.astype("float32") + scaling * (b.astype("float32") @ a.astype("float32"))
                                 ).astype(w.dtype)
    return out

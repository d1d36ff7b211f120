"""P-Tuning v2 (THUDM ChatGLM2-6B `ptuning/`, MindFormers `ChatGLM2WithPtuning2`): trained key/value prefixes.

A `PrefixEncoder` turns `pre_seq_len` learned rows into one key and one value prefix per layer:

    table [P, W]  (W = num_layers x 2 x kv_groups x kv_channels)
    prefix_projection: table [P, W] -> Linear(W, projection_dim) -> tanh -> Linear(projection_dim, W)
    -> [P, 2 x num_layers, kv_groups, kv_channels]; layer i's keys are block 2i, its values block 2i+1

as THUDM's `PrefixEncoder` and mindpet's (THUDM's projection width is hidden_size; MindFormers names it
`projection_dim`). Every real token attends to the whole prefix plus its causal past; the prefix keys are
not rotated and the real tokens keep positions 0, 1, ... (glm/model/layers.py). Dropout (`dropout_prob`)
applies to the prefix in training only. The base model is frozen: only the prefix encoder trains.

Parameter names are MindFormers' (`prefix_encoder.mindpet_delta_ptuning2_*`), so its P-Tuning checkpoints
load unchanged; THUDM's `transformer.prefix_encoder.{embedding,trans.0,trans.2}` are renamed on load
(glm/weights.py PREFIX_THUDM_NAMES).
"""

from __future__ import annotations

from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from glm.model.config import PET_TYPE, PTuningSettings  # noqa: F401  (PET_TYPE: glm/build.py imports it from here)
from glm.model.layers import Linear
from glm.runtime import ms

TABLE = "prefix_encoder.mindpet_delta_ptuning2_embedding.embedding_table"


class _Table(nn.Cell):
    """The learned prefix rows (a cell only so that the parameter gets MindFormers' name)."""

    def __init__(self, rows: int, width: int):
        super().__init__()
        self.embedding_table = Parameter(initializer(Normal(0.01), (rows, width), ms.float32),
                                         name="embedding_table")


class PrefixEncoder(nn.Cell):
    """`construct(batch)` -> prefix keys/values [2 x num_layers, B, P, kv_groups, kv_channels] in `dtype`.

    Without dropout (inference, or dropout_prob 0) the rows are the same for every example and are
    broadcast; with dropout each example draws its own mask, as THUDM's and MindFormers' encoders do.
    """

    def __init__(self, settings: PTuningSettings, num_layers: int, kv_groups: int, kv_channels: int,
                 dtype: ms.Type, init_std: float = 0.02):
        super().__init__()
        self.rows, self.layers, self.kv, self.hd = settings.pre_seq_len, num_layers, kv_groups, kv_channels
        self.width = num_layers * 2 * kv_groups * kv_channels
        self.dtype = dtype
        self.mindpet_delta_ptuning2_embedding = _Table(self.rows, self.width)
        self.projection = settings.prefix_projection
        if self.projection:
            dim = settings.projection_dim
            self.mindpet_delta_ptuning2_dense_in = Linear(self.width, dim, True, ms.float32, ms.float32, init_std)
            self.mindpet_delta_ptuning2_dense_out = Linear(dim, self.width, True, ms.float32, ms.float32, init_std)
        # nn.Dropout is swapped for the resumable CountedDropout by the trainer (glm/dropout.py).
        self.dropout = nn.Dropout(p=settings.dropout_prob) if settings.dropout_prob > 0 else None

    def construct(self, batch: int) -> Tensor:
        rows = self.mindpet_delta_ptuning2_embedding.embedding_table
        if self.projection:
            h = self.mindpet_delta_ptuning2_dense_in(rows)
            # tanh(h) = 2 sigmoid(2h) - 1: MindSpore's CPU Tanh kernel is off by up to 1e-4 (measured on
            # N(0, 3) inputs), the sigmoid form by 2e-6.
            rows = self.mindpet_delta_ptuning2_dense_out(2.0 * ops.sigmoid(2.0 * h) - 1.0)
        rows = rows.astype(self.dtype).reshape(1, self.rows, self.width)
        rows = ops.broadcast_to(rows, (batch, self.rows, self.width))
        if self.dropout is not None and self.training:
            rows = self.dropout(rows)
        rows = rows.reshape(batch, self.rows, 2 * self.layers, self.kv, self.hd)
        return rows.transpose(2, 0, 1, 3, 4)


def freeze_all_but_prefix(model: nn.Cell) -> None:
    """The base model is frozen; only `prefix_encoder.*` trains."""
    for p in model.get_parameters():
        p.requires_grad = p.name.startswith("prefix_encoder.")

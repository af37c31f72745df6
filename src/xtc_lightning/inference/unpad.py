"""Padding removal: a BERT-style classifier's forward over the real tokens of a right-padded batch.

With ``unpad=True`` (BERT-style classifiers: ``base_model`` with ``embeddings``,
``encoder`` and ``pooler``, a ``dropout`` + ``classifier`` head) the real tokens of a
right-padded batch run through the encoder as one packed sequence, so every linear,
LayerNorm and GELU touches only real tokens; attention alone scatters them back to a
``(batch, heads, longest, head dim)`` grid masked to each sentence (no scatter when no
position is padding). Every per-token operation is unchanged (activation scales are per
token, so the codes are identical) and the pooler reads each sentence's first token, as
the padded model does. GLUE dev batches padded to 128 hold ~20% real tokens on SST-2.
Batches whose first column is padding (left padding), ``inputs_embeds`` or extra outputs
take the model's own (padded) forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.modeling_outputs import SequenceClassifierOutput

UNPADDED_ATTENTION = "xtc_unpadded"


def unpadded_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    """Attention of packed tokens ``(1, heads, N, d)``: scattered to a padded grid, attended per sentence.

    ``kwargs["xtc_unpad"]`` (set by ``UnpaddedForward``) holds the token positions in the
    ``(batch, longest)`` grid, the key mask and whether to use sdpa or the eager formula.
    """
    grid: _PaddingGrid = kwargs["xtc_unpad"]
    heads, dim = query.shape[1], query.shape[3]

    def to_grid(x: Tensor) -> Tensor:
        if grid.full:  # no padding: the packed tokens are the grid, row by row
            return x[0].transpose(0, 1).reshape(grid.batch, grid.length, heads, dim).transpose(1, 2)
        out = x.new_zeros(grid.batch * grid.length, heads, dim)
        out.index_copy_(0, grid.index, x[0].transpose(0, 1))
        return out.view(grid.batch, grid.length, heads, dim).transpose(1, 2)

    q, k, v = to_grid(query), to_grid(key), to_grid(value)
    if grid.sdpa:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=grid.key_mask, scale=scaling)
    else:  # transformers' eager formula: additive mask, softmax, weighted sum
        scale = dim**-0.5 if scaling is None else scaling
        scores = torch.matmul(q, k.transpose(2, 3)) * scale
        if grid.key_mask is not None:
            scores = scores.masked_fill(~grid.key_mask, torch.finfo(scores.dtype).min)
        out = torch.matmul(F.softmax(scores, dim=-1), v)
    out = out.transpose(1, 2).reshape(grid.batch * grid.length, heads, dim)
    if not grid.full:
        out = out.index_select(0, grid.index)
    return out.unsqueeze(0), None


AttentionInterface.register(UNPADDED_ATTENTION, unpadded_attention)


class _PaddingGrid:
    """Where the real tokens of a right-padded batch sit: ``index`` into the flattened ``(batch, length)`` grid."""

    def __init__(self, attention_mask: Tensor, sdpa: bool):
        real = attention_mask.bool()
        self.batch = real.shape[0]
        self.length = int(real.any(0).nonzero().max()) + 1  # up to the last column holding a real token
        real = real[:, : self.length]
        self.index = real.reshape(-1).nonzero().squeeze(1)
        self.full = self.index.numel() == real.numel()  # every position is a real token
        self.key_mask = None if self.full else real[:, None, None, :]  # None: every key is real
        counts = real.sum(1)
        self.first = torch.cumsum(counts, 0) - counts  # each sentence's first token in the packed order
        self.sdpa = sdpa

    def pack(self, t: Tensor) -> Tensor:
        """``(batch, T)`` -> the real tokens as ``(1, N)``."""
        return t[:, : self.length].reshape(-1).index_select(0, self.index).unsqueeze(0)


class UnpaddedForward:
    """A BERT-style classifier's forward over the real tokens only (installed as ``model.forward``).

    Every input runs on the process's intra-op threads, few tokens too: switching to one thread
    for inputs of <= 64 tokens, as this forward did, lost once the compiled kernels split their
    rows over the threads (batch 1 at 2 threads, paused, two runs: 4.4 / 6.6 ms on 2 threads vs
    5.2 / 7.7 ms switched to 1). Only the compiled kernels of calls of at most ``SERIAL_ROWS``
    tokens run on one thread (``kernels.py``); the GEMMs always use every thread.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    @staticmethod
    def supports(model: nn.Module) -> bool:
        base = getattr(model, "base_model", None)
        return (
            base is not None
            and base is not model
            and all(
                isinstance(getattr(base, n, None), nn.Module) for n in ("embeddings", "encoder", "pooler")
            )
            and isinstance(getattr(model, "classifier", None), nn.Module)
            and isinstance(getattr(model, "dropout", None), nn.Module)
        )

    @property
    def __code__(self):
        """torch.export names its trace after ``model.forward.__code__``."""
        return type(self).__call__.__code__

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        usable = (
            not torch.compiler.is_compiling()  # torch.export traces the padded forward (no data-dependent shapes)
            and input_ids is not None
            and attention_mask is not None
            and not kwargs
            and bool(attention_mask[:, 0].all())  # right padding: the pooler's first token is real
            and not self.model.training
        )
        if not usable:  # the class's own (padded) forward
            return type(self.model).forward(
                self.model,
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                **kwargs,
            )
        grid = _PaddingGrid(attention_mask, sdpa=self.model.config._attn_implementation != "eager")
        return self.packed_forward(input_ids, token_type_ids, grid)

    def packed_forward(self, input_ids: Tensor, token_type_ids: Tensor | None, grid: _PaddingGrid):
        model, base = self.model, self.model.base_model
        config = model.config
        positions = torch.arange(grid.length, device=input_ids.device).expand(grid.batch, -1)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        hidden = base.embeddings(
            input_ids=grid.pack(input_ids),
            token_type_ids=grid.pack(token_type_ids),
            position_ids=grid.pack(positions),
        )
        chosen = config._attn_implementation
        config._attn_implementation = UNPADDED_ATTENTION
        try:
            hidden = base.encoder(hidden, xtc_unpad=grid).last_hidden_state
        finally:
            config._attn_implementation = chosen
        first = hidden[0].index_select(0, grid.first).unsqueeze(1)  # (batch, 1, hidden)
        logits = model.classifier(model.dropout(base.pooler(first)))
        return SequenceClassifierOutput(logits=logits)

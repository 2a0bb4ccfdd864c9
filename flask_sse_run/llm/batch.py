"""Sequences decoding together on one device: one KV cache, rows joining and leaving between steps.

Imports torch: import it lazily (the scheduler's loop does). The layout is the one of
text-generation-inference's ``CausalLMBatch`` (``concatenate``, ``filter``), on the model's
ordinary forward and a transformers ``DynamicCache``:

* Every row's tokens end at the cache's last column; a shorter row is padded on the left. The
  padding is masked out (a 2-D attention mask, built from each row's pad count) and each row's
  position ids count its own tokens only, so a row computes what it would compute alone, up to
  floating-point rounding (in float64 the tokens are exactly those of a lone ``generate()``).
* New prompts are prefilled as a group (:class:`Prefill`), left-padded to the longest, a few
  columns per call so that one long prompt holds the running rows up for one chunk at a time,
  then joined to the running batch (:meth:`DecodeBatch.concatenate`): the narrower of the two
  caches is padded on the left to the wider one's width.
* A finished row leaves at once (:meth:`DecodeBatch.filter`); the columns that only padding
  still uses are then cut off, so the cache is as wide as its longest row.

A step that raises may leave the cache half-updated (some layers one column longer): the
caller must drop the rows of that batch, as the scheduler does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..extras import missing_extra

try:
    import torch
    import torch.nn.functional as F
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer
except ImportError as error:
    raise missing_extra("llm", error) from error

from .rows import Row

__all__ = ["DecodeBatch", "Prefill", "check_model"]


def check_model(model: Any) -> None:
    """Raise :class:`TypeError` unless ``model``'s cache is plain full-attention ``DynamicLayer`` s.

    Those are the layers whose key and value tensors this module pads, concatenates and
    selects; sliding-window, quantized or linear-attention layers are laid out otherwise.
    """
    cache = DynamicCache(config=model.config)
    kinds = {type(layer).__name__ for layer in cache.layers}
    if cache.layers and kinds != {DynamicLayer.__name__}:
        raise TypeError(f"batched decoding needs DynamicLayer caches; {type(model).__name__} uses {kinds}")


def _layers(cache: DynamicCache) -> list[Any]:
    """The cache's layers: ``DynamicLayer`` s (see :func:`check_model`), ``keys``/``values`` set."""
    return list(cache.layers)


def _pad_mask(pads: torch.Tensor, width: int) -> torch.Tensor:
    """``[rows, width]``: True where a row has a token, False on its left padding."""
    return torch.arange(width, device=pads.device)[None, :] >= pads[:, None]


def _last_logits(output: Any) -> torch.Tensor:
    # float32 whatever the model's dtype, as generate() does before its logits processors.
    logits: torch.Tensor = output.logits[:, -1].to(dtype=torch.float32)
    return logits


class DecodeBatch:
    """Rows that decode one token each per :meth:`step`, sharing one left-padded cache.

    ``rows`` are the requests (kept in the cache's row order), ``pads`` each row's left padding,
    ``width`` the cache's length, ``next_ids`` each row's last chosen token (fed at the next step).
    """

    def __init__(
        self,
        model: Any,
        rows: list[Row],
        cache: DynamicCache,
        pads: list[int],
        width: int,
        next_ids: list[int],
    ) -> None:
        self.model = model
        self.rows = rows
        self.cache = cache
        self.pads = pads
        self.width = width
        self._device = model.device
        self._pads = torch.tensor(pads, dtype=torch.long, device=self._device)
        self._next = torch.tensor(next_ids, dtype=torch.long, device=self._device)[:, None]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def kv_tokens(self) -> int:
        """Cache columns held, padding included (rows x width)."""
        return len(self.rows) * self.width

    def step(self) -> torch.Tensor:
        """Run every row one token forward; return the logits of its next token (float32)."""
        positions = (self.width - self._pads)[:, None]
        # No padding (one row, or rows of equal length): no mask to build, as generate() does.
        mask = _pad_mask(self._pads, self.width + 1) if any(self.pads) else None
        output = self.model(
            input_ids=self._next,
            attention_mask=mask,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.width += 1
        return _last_logits(output)

    def push(self, tokens: Sequence[int]) -> None:
        """Set the tokens the next step feeds (those just chosen, one per row)."""
        self._next = torch.tensor(list(tokens), dtype=torch.long, device=self._device)[:, None]

    def filter(self, keep: Sequence[int]) -> None:
        """Keep only the rows at indices ``keep`` (in that order); cut the columns no row uses."""
        index = torch.tensor(list(keep), dtype=torch.long, device=self._device)
        self.rows = [self.rows[i] for i in keep]
        self.pads = [self.pads[i] for i in keep]
        self._next = self._next[index]
        trim = min(self.pads, default=0)
        for layer in _layers(self.cache):
            if layer.is_initialized:
                layer.keys = layer.keys[index, :, trim:]
                layer.values = layer.values[index, :, trim:]
        self.pads = [pad - trim for pad in self.pads]
        self.width -= trim
        self._pads = torch.tensor(self.pads, dtype=torch.long, device=self._device)

    def concatenate(self, other: DecodeBatch) -> None:
        """Append ``other``'s rows; the narrower cache is padded on the left to the wider."""
        width = max(self.width, other.width)
        for mine, theirs in zip(_layers(self.cache), _layers(other.cache), strict=True):
            mine.keys = torch.cat([_widen(mine.keys, width), _widen(theirs.keys, width)])
            mine.values = torch.cat([_widen(mine.values, width), _widen(theirs.values, width)])
        self.rows = self.rows + other.rows
        mine_pads = [pad + width - self.width for pad in self.pads]
        self.pads = mine_pads + [pad + width - other.width for pad in other.pads]
        self.width = width
        self._pads = torch.tensor(self.pads, dtype=torch.long, device=self._device)
        self._next = torch.cat([self._next, other._next])


def _widen(states: torch.Tensor, width: int) -> torch.Tensor:
    """Pad ``[rows, heads, length, dim]`` states on the left of ``length`` to ``width`` (zeros)."""
    missing = width - states.shape[-2]
    return F.pad(states, (0, 0, missing, 0)) if missing else states


class Prefill:
    """Prefill a group of prompts, left-padded to the longest, ``chunk`` tokens per :meth:`advance`.

    Each call runs the next columns of every row (``chunk // rows`` of them, at least one);
    the last call returns the logits of each row's first generated token, and
    :meth:`to_batch` then turns the group into a :class:`DecodeBatch`.
    """

    def __init__(self, model: Any, rows: list[Row], pad_id: int, chunk: int) -> None:
        self.model = model
        self.rows = rows
        self._device = model.device
        self.width = max(len(row.prompt_ids) for row in rows)
        self.pads = [self.width - len(row.prompt_ids) for row in rows]
        self._ids = torch.tensor(
            [[pad_id] * pad + row.prompt_ids for pad, row in zip(self.pads, rows, strict=True)],
            dtype=torch.long,
            device=self._device,
        )
        self._pads = torch.tensor(self.pads, dtype=torch.long, device=self._device)
        self.cache = DynamicCache(config=model.config)
        self.done = 0  # columns prefilled
        self.columns = max(1, chunk // len(rows))

    @staticmethod
    def steps_for(rows: int, width: int, chunk: int) -> int:
        """How many :meth:`advance` calls a group of ``rows`` prompts of ``width`` tokens takes."""
        columns = max(1, chunk // rows)
        return -(-width // columns)

    def advance(self) -> torch.Tensor | None:
        """Prefill the next chunk; the first tokens' logits (float32) once the prompts are in."""
        start, end = self.done, min(self.width, self.done + self.columns)
        columns = torch.arange(start, end, device=self._device)
        positions = (columns[None, :] - self._pads[:, None]).clamp(min=0)
        mask = _pad_mask(self._pads, end) if any(self.pads) else None
        output = self.model(
            input_ids=self._ids[:, start:end],
            attention_mask=mask,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.done = end
        return _last_logits(output) if end == self.width else None

    def filter(self, keep: Sequence[int]) -> None:
        """Keep only the rows at indices ``keep`` (rows cancelled while the group prefills)."""
        index = torch.tensor(list(keep), dtype=torch.long, device=self._device)
        self.rows = [self.rows[i] for i in keep]
        self.pads = [self.pads[i] for i in keep]
        self._ids = self._ids[index]
        self._pads = self._pads[index]
        if self.done:
            self.cache.batch_select_indices(index)

    def to_batch(self, first_tokens: Sequence[int]) -> DecodeBatch:
        """The prefilled group as a batch whose next step feeds ``first_tokens``."""
        batch = DecodeBatch(self.model, self.rows, self.cache, self.pads, self.width, list(first_tokens))
        if min(self.pads) > 0:  # its longest prompts were cancelled: cut their columns
            batch.filter(range(len(batch)))
        return batch

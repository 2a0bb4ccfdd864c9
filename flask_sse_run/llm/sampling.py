"""Choose each row's next token from one step's logits, every row with its own parameters.

Imports torch: import it lazily (the scheduler's loop does). The rules are ``generate()``'s, in
its order, applied to all rows of a step at once: repetition penalty (over the prompt and the
tokens so far), no EOS before ``min_new_tokens``, then greedy ``argmax`` for rows with
temperature 0, or temperature, top-k, top-p and a draw for the others. Greedy rows therefore
pick the tokens a lone ``generate()`` picks from the same logits.

A draw is the inverse of the row's cumulative distribution at a uniform number from the row's
own ``random.Random`` (seeded with the request's seed): what one row draws does not depend on
which other rows share the step, nor on torch's global generator. ``generate()`` draws from
that global generator, so a seeded row's text differs from ``generate()``'s with the same seed,
but is the same every time, alone or batched.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..extras import missing_extra

try:
    import torch
except ImportError as error:
    raise missing_extra("llm", error) from error

from .rows import Row

__all__ = ["RowSampler", "choose_tokens"]


class RowSampler:
    """A row's sampling state: which tokens it has seen (for the repetition penalty)."""

    def __init__(self, row: Row, vocab_size: int, device: torch.device) -> None:
        self.row = row
        self.seen: torch.Tensor | None = None
        if row.params.repetition_penalty != 1.0:
            seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            ids = torch.tensor(row.prompt_ids, dtype=torch.long, device=device)
            seen[ids[ids < vocab_size]] = True
            self.seen = seen

    def saw(self, token: int) -> None:
        """Record a chosen token (the repetition penalty counts it from the next step on)."""
        if self.seen is not None:
            self.seen[token] = True


def _rows_tensor(rows: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def choose_tokens(logits: torch.Tensor, rows: Sequence[Row]) -> list[int]:
    """The next token of each row from ``logits`` (``[len(rows), vocab]``, float32).

    Each row's ``sampler`` must be a :class:`RowSampler`. ``logits`` is modified in place.
    """
    device = logits.device
    samplers: list[RowSampler] = [row.sampler for row in rows]
    _penalize_repeats(logits, samplers)
    no_eos = [i for i, row in enumerate(rows) if row.generated < row.params.min_new_tokens and row.eos_ids]
    if no_eos:
        eos = sorted({e for i in no_eos for e in rows[i].eos_ids if e < logits.shape[-1]})
        if eos:
            logits[_rows_tensor(no_eos, device)[:, None], _rows_tensor(eos, device)[None, :]] = -float("inf")
    sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
    if not sampled:
        chosen: list[int] = logits.argmax(dim=-1).tolist()
    else:
        tokens = logits.argmax(dim=-1)
        index = _rows_tensor(sampled, device)
        tokens[index] = _draw(logits[index], [rows[i] for i in sampled])
        chosen = tokens.tolist()
    for sampler, token in zip(samplers, chosen, strict=True):
        sampler.saw(token)
    return chosen


def _penalize_repeats(logits: torch.Tensor, samplers: Sequence[RowSampler]) -> None:
    """``RepetitionPenaltyLogitsProcessor`` per row: seen tokens' logits divided (or multiplied,
    when negative) by the row's penalty."""
    penalized = [i for i, sampler in enumerate(samplers) if sampler.seen is not None]
    if not penalized:
        return
    device = logits.device
    index = _rows_tensor(penalized, device)
    seen = torch.stack([samplers[i].seen for i in penalized])  # type: ignore[misc]
    penalty = torch.tensor(
        [samplers[i].row.params.repetition_penalty for i in penalized], dtype=logits.dtype, device=device
    )[:, None]
    scores = logits[index]
    scores = torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)
    logits[index] = scores


def _draw(logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    """Sample one token per row: temperature, then top-k, then top-p, then a seeded draw."""
    device, vocab = logits.device, logits.shape[-1]
    params = [row.params for row in rows]
    temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=device)[:, None]
    scores, order = (logits / temperature).sort(dim=-1, descending=True)
    # top-k keeps the tokens at least as likely as the k-th (ties included, as transformers).
    k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], device=device)
    kth = scores.gather(1, (k - 1)[:, None])
    scores = scores.masked_fill(scores < kth, -float("inf"))
    # top-p drops a token once the tokens more likely than it hold top_p of the mass; the most
    # likely one always stays. A row with top_p 1 keeps everything (transformers skips it).
    top_p = [p.top_p if p.top_p < 1 else float("inf") for p in params]
    probs = scores.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs
    mass = torch.tensor(top_p, dtype=probs.dtype, device=device)[:, None]
    scores = scores.masked_fill(before >= mass, -float("inf"))
    cdf = scores.softmax(dim=-1).cumsum(dim=-1)
    uniform = torch.tensor([row.rng.random() for row in rows], dtype=cdf.dtype, device=device)[:, None]
    # right=True: the first token whose cumulative mass exceeds the draw, never one of no mass.
    picked = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).clamp(max=vocab - 1)
    return order.gather(1, picked).squeeze(1)

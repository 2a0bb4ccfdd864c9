"""A request's sampling parameters, and the ``generate()`` keyword arguments they mean.

Pure Python. The mapping is where a hosted-platform example went wrong: it passed
``temperature``/``top_p`` without ``do_sample=True``, so ``generate()`` decoded greedily and
ignored them. Here ``temperature == 0`` means greedy decoding (and no sampling parameter is
passed at all, so transformers has nothing to warn about), anything else means sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["GenerationParams"]


@dataclass(frozen=True)
class GenerationParams:
    """What to generate. Ranges are checked by the endpoint's signature; ``__post_init__`` only
    guards against programming errors."""

    max_new_tokens: int = 256
    #: Never stop on EOS before this many tokens (fixed lengths for tests and benchmarks).
    min_new_tokens: int = 0
    #: 0 means greedy decoding; otherwise the softmax temperature of sampling.
    temperature: float = 0.7
    #: Nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p``.
    top_p: float = 0.9
    #: Keep the ``top_k`` most likely tokens; 0 keeps them all.
    top_k: int = 50
    #: Above 1 discourages repeating tokens (also with greedy decoding); 1 turns it off.
    repetition_penalty: float = 1.0
    #: The output ends before the first of these strings.
    stop: tuple[str, ...] = ()
    #: The same seed and parameters give the same output: batched, whatever else is in the batch
    #: (each row draws from its own generator); on the serial path, with one ``generate()`` at
    #: a time (it seeds torch's global generator, so the two paths give different text).
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError("need max_new_tokens >= 1 and 0 <= min_new_tokens <= max_new_tokens")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be positive")

    @property
    def greedy(self) -> bool:
        """Whether decoding is greedy (``temperature == 0``)."""
        return self.temperature == 0

    def generate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``model.generate()`` for these parameters."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "repetition_penalty": self.repetition_penalty,
            # Beam search cannot stream; say so, whatever the model's generation_config holds.
            "num_beams": 1,
        }
        if self.greedy:
            kwargs["do_sample"] = False
        else:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs

"""Tiny random Falcon models and tokenizers, saved like a hub checkpoint, for CPU tests.

Nothing is downloaded: the tokenizers are built with the ``tokenizers`` library, the model is a
``FalconForCausalLM`` with random weights and Falcon-7B's architecture (multi-query attention,
parallel attention, rotary embeddings) at a toy size. Both are saved with ``save_pretrained`` so
that tests load them through the same ``from_pretrained`` path as the real model.

Two tokenizers: a WordLevel one (one word per token, so a stream is easy to read and to check)
and a byte-level BPE one like Falcon's own (tokens hold parts of multi-byte UTF-8 characters).
Also run as a script (``python -m tests.tiny_falcon DIR --size 70m``) by the benchmark.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

EOS = "<|endoftext|>"
UNK = "<unk>"
WORDS = (
    "Tell me a story about the snow man who lived in a small town near the sea . Once upon a time "
    "there was one old cat and two young dogs , they ran far away and came back home every night "
    "to eat bread with cheese while singing songs under bright stars ! Why not ? Because life is "
    "short and the world is big so we walk slowly and think about green trees blue rivers red "
    "houses quiet roads happy children and stories that never end"
).split()
# Text with one-, two-, three- and four-byte UTF-8 characters for training the byte-level BPE.
CORPUS = [
    "Tell me a story about the café, the naïve résumé and the snowman ☃ in Zürich.",
    "Les élèves déjà prêts mangent des crêpes à Noël; 東京 and 北京 are cities. 🎉🙂 emoji!",
    "Ωμέγα λόγος, Привет мир, שלום, مرحبا — “quotes” … and ☃☃ ★ ♥ €100 ¥200 £300.",
    "The quick brown fox jumps over the lazy dog 0123456789 times; e\u0301 combines.",
]
SIZES: dict[str, dict[str, int]] = {
    # hidden, layers, heads: a few hundred thousand parameters, ~1 ms a token on a laptop core.
    "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4},
    # ~70M parameters: the benchmark's "real work" model.
    "70m": {"hidden_size": 640, "num_hidden_layers": 17, "num_attention_heads": 10},
}


def word_tokenizer() -> Any:
    """A WordLevel tokenizer: whitespace-separated words, one token each, joined by spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {UNK: 0, EOS: 1}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, unk_token=UNK)


def byte_bpe_tokenizer(vocab_size: int = 400) -> Any:
    """A byte-level BPE tokenizer (Falcon's kind) trained on :data:`CORPUS`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS)


def save_model(
    directory: Path,
    *,
    tokenizer: str = "word",
    size: str = "tiny",
    context: int = 4096,
    seed: int = 0,
    init_range: float = 0.02,
) -> Path:
    """Save a random Falcon and its tokenizer (``"word"`` or ``"bpe"``) to ``directory``.

    ``init_range`` is the weights' standard deviation: at the usual 0.02 a tiny model's next
    token hardly depends on the tokens before (greedy decoding repeats one token); 0.5 makes
    it depend on all of them, so that a test sees a wrong mask or a wrong cache.
    """
    import torch
    from transformers import FalconConfig, FalconForCausalLM

    tok = word_tokenizer() if tokenizer == "word" else byte_bpe_tokenizer()
    eos = tok.convert_tokens_to_ids(EOS)
    config = FalconConfig(
        vocab_size=len(tok),
        max_position_embeddings=context,
        bos_token_id=eos,
        eos_token_id=eos,
        initializer_range=init_range,
        **SIZES[size],
    )
    torch.manual_seed(seed)
    model = FalconForCausalLM(config)
    never_ends(model, eos)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def never_ends(model: Any, eos: int) -> None:
    """Make ``eos`` a token the model never draws.

    A random model gives the end-of-sequence token its share of every draw (about 1 in 80 with
    the word tokenizer): a sampled request for 3 tokens ended early about once in 16, and the
    tests that count tokens or text failed by chance. The final norm's first dimension becomes a
    constant 1 (weight 0, bias 1), and the (tied) embedding of ``eos`` is -30 on that dimension
    and 0 elsewhere: its logit is -30 whatever came before. Tests that need an end make a word
    the model speaks the end (``config.eos_token_id``).
    """
    import torch

    with torch.no_grad():
        norm = model.transformer.ln_f
        norm.weight[0], norm.bias[0] = 0.0, 1.0
        row = model.get_output_embeddings().weight[eos]
        row.zero_()
        row[0] = -30.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--tokenizer", choices=["word", "bpe"], default="word")
    args = parser.parse_args()
    save_model(args.directory, tokenizer=args.tokenizer, size=args.size)


if __name__ == "__main__":
    main()

"""Load a causal LM and its tokenizer the way the device wants them.

torch and transformers are imported inside the functions: importing this module costs nothing
and works without the ``llm`` extra. Call :func:`load_pretrained` in the process and on the
thread that will run the model (after gunicorn forks, on the device's dedicated thread).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..concurrency import gevent_patched

__all__ = ["LoadedModel", "import_hub_client", "import_runtime", "load_kwargs", "load_pretrained"]


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to generate, its tokenizer, and facts for a health endpoint."""

    model: Any
    tokenizer: Any
    device: str
    dtype: str
    parameters: int
    context: int
    load_seconds: float


def import_hub_client() -> None:
    """Import huggingface_hub's HTTP client; under gevent, call it on the hub's thread.

    Its import chain (httpcore2 imports trio to detect it) calls ``ctypes.util.find_library``,
    a subprocess, which gevent runs only on the hub's thread, and reads ``select.epoll``, which
    gevent's patching removes: under gevent the attribute is put back for the import (nothing
    creates an epoll object then) and removed again. Takes a few tenths of a second. After it,
    torch and transformers (:func:`import_runtime`) import in any thread. Raises
    :class:`ImportError` without huggingface_hub (the ``llm`` extra).
    """
    if "huggingface_hub.hf_api" in sys.modules or not gevent_patched():
        import huggingface_hub.hf_api

        return
    import select

    from gevent import monkey

    patched = not hasattr(select, "epoll")
    if patched:
        setattr(select, "epoll", monkey.get_original("select", "epoll"))  # noqa: B010
    try:
        import huggingface_hub.hf_api  # noqa: F401
    finally:
        if patched:
            delattr(select, "epoll")


def import_runtime() -> None:
    """Import torch and transformers (and the model classes' modules) in the calling thread.

    Takes seconds: under gevent, call it on the device's OS thread (the service does), after
    :func:`import_hub_client` on the hub's; the worker serves meanwhile. Importing starts no
    torch thread. Raises :class:`ImportError` without the ``llm`` extra.

    Sets ``OMP_WAIT_POLICY=PASSIVE`` unless it is set (OpenMP reads it when torch loads): a
    server's torch thread shares the cores with the threads serving requests and with other
    processes, and OpenMP's default, idle threads spinning for their next task, then takes
    them. On this project's 2-core machine, under load, a decode step of the 70M-parameter
    model in a thread took 0.5-1 s with two spinning threads and 33-39 ms without.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import_hub_client()
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria  # noqa: F401


def load_kwargs(cuda: bool) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments: bf16 spread over the GPUs, or float32 on the CPU.

    ``device_map="auto"`` (which needs ``accelerate``) places the layers on every visible GPU,
    so a model larger than one GPU still loads; CPUs lack fast bf16 matrix products, so float32.
    """
    import torch

    if cuda:
        return {"dtype": torch.bfloat16, "device_map": "auto"}
    return {"dtype": torch.float32}


def _context(model: Any, tokenizer: Any) -> int:
    """How many tokens (prompt and generated) the model can attend to."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 0:
        return limit
    limit = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a limit say int(1e30): fall back to Falcon's 2048.
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else 2048


def load_pretrained(source: str, log: Callable[[str], object] | None = None) -> LoadedModel:
    """Load ``source`` (a hub id or a local directory) with ``from_pretrained``.

    ``log`` receives progress lines. Raises what transformers raises (``OSError`` for a
    missing model, ``ImportError`` without torch).
    """
    say = log or logging.getLogger(__name__).info
    began = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if gevent_patched():
        # Under gevent, a thread that transformers starts here (its weight-reading pool, tqdm's
        # progress-bar monitor) is a greenlet of this thread: it never runs in parallel, and the
        # worker's exit then waits for it until gunicorn kills the worker (graceful_timeout).
        # Read the weights sequentially and report progress in the log lines below instead.
        os.environ.setdefault("HF_DEACTIVATE_ASYNC_LOAD", "1")
        from huggingface_hub.utils import disable_progress_bars  # type: ignore[attr-defined]
        from transformers.utils import logging as transformers_logging

        disable_progress_bars()
        disable_transformers_bars: Any = transformers_logging.disable_progress_bar
        disable_transformers_bars()

    cuda = torch.cuda.is_available()
    kwargs = load_kwargs(cuda)
    say(f"loading the tokenizer of {source}")
    tokenizer = AutoTokenizer.from_pretrained(source)
    say(
        f"loading the weights of {source} in {str(kwargs['dtype']).removeprefix('torch.')} "
        f"on {'the GPUs (device_map=auto)' if cuda else 'the CPU'}"
    )
    model: Any = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    model.eval()
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=str(model.device),
        dtype=str(model.dtype).removeprefix("torch."),
        parameters=sum(p.numel() for p in model.parameters()),
        context=_context(model, tokenizer),
        load_seconds=round(time.perf_counter() - began, 2),
    )
    say(
        f"loaded {source}: {loaded.parameters:,} parameters, {loaded.dtype} on {loaded.device}, "
        f"context {loaded.context} tokens, in {loaded.load_seconds} s"
    )
    return loaded

"""Stream the text a Hugging Face causal LM generates (needs the ``llm`` extra).

Importing this package does not import torch: :mod:`.generation` (the one module that does) is
imported when a model is used. The core package never imports this one.
"""

from __future__ import annotations

from .admission import DeviceQueue, Ticket
from .detokenize import IncrementalDetokenizer
from .loading import LoadedModel, import_runtime, load_kwargs, load_pretrained
from .params import GenerationParams
from .service import GenerationService
from .stops import StopStrings
from .upstream import UpstreamService

__all__ = [
    "DeviceQueue",
    "GenerationParams",
    "GenerationService",
    "IncrementalDetokenizer",
    "LoadedModel",
    "StopStrings",
    "Ticket",
    "UpstreamService",
    "import_runtime",
    "load_kwargs",
    "load_pretrained",
]

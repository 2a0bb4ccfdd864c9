"""Stream the text a Hugging Face causal LM generates (needs the ``llm`` extra).

Importing this package does not import torch: the modules that do (:mod:`.generation`,
:mod:`.batch`, :mod:`.sampling`) are imported when a model is used. The core package never
imports this one.
"""

from __future__ import annotations

from .admission import DeviceQueue, Ticket
from .detokenize import IncrementalDetokenizer
from .loading import LoadedModel, import_hub_client, import_runtime, load_kwargs, load_pretrained
from .params import GenerationParams
from .scheduler import BatchScheduler
from .service import GenerationService
from .stops import StopStrings
from .upstream import UpstreamService

__all__ = [
    "BatchScheduler",
    "DeviceQueue",
    "GenerationParams",
    "GenerationService",
    "IncrementalDetokenizer",
    "LoadedModel",
    "StopStrings",
    "Ticket",
    "UpstreamService",
    "import_hub_client",
    "import_runtime",
    "load_kwargs",
    "load_pretrained",
]

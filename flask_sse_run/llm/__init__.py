"""Stream the text a Hugging Face causal LM generates: the Falcon blueprint and what it runs on.

Public surface: :data:`falcon_blueprint` and :func:`init_falcon` (``/falcon/run``,
``/falcon/health`` and the OpenAI routes on any app), the services behind it
(:class:`GenerationService` for a model in this process, :class:`UpstreamService` for an
OpenAI-compatible engine), :class:`GenerationParams`, and the pieces they are made of.

Importing this package needs no extra and does not import torch: the blueprint answers 503 with
the install hint until ``FALCON_MODEL`` or ``FALCON_UPSTREAM`` is set. The modules that import
torch (:mod:`.generation`, :mod:`.batch`, :mod:`.sampling`) need the ``llm`` extra
(``pip install 'flask-sse-run[llm]'``) and are imported when a model is used; importing one without
it raises an :class:`ImportError` that names the extra. The core package never imports this one.
"""

from __future__ import annotations

from .admission import DeviceQueue, Ticket
from .detokenize import IncrementalDetokenizer
from .falcon import falcon_blueprint, init_falcon
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
    "falcon_blueprint",
    "import_hub_client",
    "import_runtime",
    "init_falcon",
    "load_kwargs",
    "load_pretrained",
]

"""Serving: the continuous-batching inference engine behind `python -m gpt serve`.

`Engine` (gpt/serve/engine.py) owns a model on one scheduler thread and decodes every
request together in a `SlotCache` (gpt/serve/slot_cache.py); a request's tokens do not
depend on what else runs (gpt/serve/batch_invariance.py). What a request is, its
parameters, events and handle: gpt/serve/request.py.
"""

from .engine import Engine, Finished, QueueFull, RequestHandle, SamplingParams, TokenEvent
from .slot_cache import SlotCache

__all__ = ["Engine", "Finished", "QueueFull", "RequestHandle", "SamplingParams", "SlotCache", "TokenEvent"]

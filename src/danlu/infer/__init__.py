"""One inference engine for chat, web and serve: a base (+ adapters), many replies decoded together.

- :mod:`danlu.infer.adapters`: the base model with named LoRA adapters and their tokenizers.
- :mod:`danlu.infer.sampling`: per-request settings and picking each row's next token.
- :mod:`danlu.infer.generation`: a reply as its reader sees it, and token ids → text.
- :mod:`danlu.infer.reasoning`: a reasoning model's ``<think>`` block split from the answer.
- :mod:`danlu.infer.batch`: the continuous-batching decoder thread and its bounded queue.
- :mod:`danlu.infer.engine`: :class:`Engine`, prompts (chat templates, tools, the context
  window) in, :class:`Generation` out.
"""

from danlu.infer.batch import Busy
from danlu.infer.engine import ContextLengthError, Engine, RequestError, tool_calls
from danlu.infer.generation import Delta, Generation, merged
from danlu.infer.sampling import GenerationSettings, TokenLogprob

__all__ = [
    "Busy",
    "ContextLengthError",
    "Delta",
    "Engine",
    "Generation",
    "GenerationSettings",
    "RequestError",
    "TokenLogprob",
    "merged",
    "tool_calls",
]

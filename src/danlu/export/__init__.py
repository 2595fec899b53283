"""Ship a fine-tuned model: merge a LoRA adapter into its base, convert a model folder to GGUF.

Both steps check their own output (logit parity against the source) and write into a temp
path that replaces the target only at the end, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

from danlu.export.gguf import GGUF_ARCHITECTURES, GgufResult, export_gguf
from danlu.export.merge import MergeResult, merge

__all__ = ["GGUF_ARCHITECTURES", "GgufResult", "MergeResult", "export_gguf", "merge"]

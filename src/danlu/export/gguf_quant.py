"""llama.cpp's own quantizer, through llama-cpp-python's binding of ``llama_model_quantize``.

The k-quants (``q4_k_m``, ``q5_k_m``, ``q6_k``) mix block types per tensor the way llama.cpp's
``llama-quantize`` does (e.g. Q4_K_M keeps half the attention-value and feed-forward-down
tensors, and the output, in Q6_K); making them with llama.cpp itself keeps them exactly that.
llama-cpp-python is an optional extra (``danlu[llama-cpp]``) because it compiles llama.cpp.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from danlu.errors import UserError

FTYPES = {
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
INSTALL = "pip install 'danlu[llama-cpp]' (compiles llama.cpp, ~6 min on 2 cores)"


def require_llama_cpp(what: str) -> Any:
    """The llama_cpp module, or a one-line error saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"{what} needs llama.cpp's quantizer: {INSTALL}") from None
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's own chatter
    return llama_cpp


def quantize(source: Path, out: Path, qtype: str, threads: int = 0) -> int:
    """Quantize the 16-bit GGUF ``source`` into ``out`` as llama-quantize does.

    Returns how many tensors llama.cpp stored in a fallback type because their rows are not a
    multiple of the k-quant block (256), as it does for e.g. SmolLM2's 576-wide layers.
    """
    llama_cpp = require_llama_cpp(f"--type {qtype}")
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: Any) -> None:
        lines.append(text.decode("utf-8", "replace"))

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[qtype])
    params.nthread = threads
    llama_cpp.llama_log_set(collect, None)  # llama.cpp's per-tensor report, kept out of the console
    try:
        failed = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) != 0
    finally:
        restore = getattr(getattr(llama_cpp, "_logger", None), "llama_log_callback", None)
        llama_cpp.llama_log_set(restore, None)
    if failed:
        raise UserError(
            f"llama.cpp could not quantize {source.name} to {qtype}: {''.join(lines)[-300:].strip()}"
        )
    return sum("falling back to" in line for line in lines)

"""danlu's fast training path, composed in at model load by ``train.fast`` (no library patching).

So far: :mod:`danlu.fast.loss`, a cross-entropy that never holds the full logits.
"""

CHUNK = 1024
"""Tokens the chunked loss projects onto the vocabulary at once: 1024 x 128,256 fp32 logits = 0.5 GiB."""

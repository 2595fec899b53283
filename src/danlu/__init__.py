"""danlu (丹炉): fine-tune chat models with LoRA, chat with them, and take them further.

Layout, left to right (a module imports only from those to its left):
config → data → model → train → export → infer → app.
"""

__version__ = "0.1.0"

"""hubsync: rebuild, verify and publish a fine-tuned model repo from a pinned base and the tuned tensors.

The package follows the pipeline: manifest -> resolve -> plan -> write -> verify -> card -> push.
Importing the package is cheap: no torch, no transformers, no huggingface_hub.
"""

__version__ = "0.1.0"

"""Base models, what is trained on them (adapters), and how they are stored (quantisation)."""

import logging

# peft imports bitsandbytes, whose CPU backend warns on AVX512-BF16 machines that an optional kernel package
# (fetched from the Hugging Face Hub) is missing; its own kernels serve instead. Nothing a user can act on.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

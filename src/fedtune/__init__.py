"""fedtune: federated fine-tuning of language models (FedIT, clustered FL, heterogeneous-rank LoRA, ...)."""

import warnings

from transformers.utils import logging as _hf_logging

# Loading a base model under a new task head reports the head as "missing";
# that is expected here and drowns the run's own output.
_hf_logging.set_verbosity_error()
_hf_logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")

__version__ = "0.1.0"

"""fedtune: federated fine-tuning of language models (FedIT, clustered FL, heterogeneous-rank LoRA, ...)."""

__version__ = "0.1.0"

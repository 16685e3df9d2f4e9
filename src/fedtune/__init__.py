"""fedtune: federated fine-tuning of language models with LoRA adapters.

Algorithms: FedIT (FedAvg of the adapters), the server optimisers FedAvgM, FedAdam, FedYogi and
FedAdagrad over its average, heterogeneous-rank LoRA (FLoRA, FLoRIST, FlexLoRA, FFA-LoRA), FedProx,
SCAFFOLD, clustered FL (FedMLLM), FedKDLoRA, FedAMoLE, FDLoRA, and the local-only and centralized references;
each runs in-process or on Flower.
"""

__version__ = "0.1.0"

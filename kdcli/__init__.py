"""kdcli: compress trained PyTorch models by knowledge distillation and structured pruning."""

__version__ = "0.1.0"

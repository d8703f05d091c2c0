"""capbalancer: a capacity-aware load-balancing reverse proxy for LLM inference on heterogeneous GPUs."""

__version__ = "0.1.0"

"""simpo: align language models with SimPO from YAML recipes."""

__version__ = "0.1.0"

"""kagent: a Python implementation of the Kata Containers guest agent."""

__version__ = "0.1.0"

"""diffmem: detect, explain and mitigate memorization in text-to-image diffusion models."""

__version__ = "0.1.0"

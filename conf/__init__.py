"""The Hydra configs of the commands, installed as the package rag_lightning.conf (pyproject.toml)."""

"""Capacity planning: what a knowledge base of a given size costs in memory, disk, refresh time and search capacity
on a cluster (the model behind `python -m rag_lightning.plan`)."""

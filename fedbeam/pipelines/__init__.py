"""Beam code only: sources, grouping, expansion, split, checks and the store writer.

Nothing here imports tensorflow_federated, so Beam workers do not pay for it.
"""

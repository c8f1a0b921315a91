"""Lineage: signed contributions, datanets, training, and adapter registration and verification against the chain."""

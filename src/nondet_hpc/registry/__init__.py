"""Declarations read by every layer: each source, stream, model and metric is declared once here.

Torch-free and Hydra-free at import: the config schema, the trainer, the reducer and the docs all
read these tables instead of keeping lists of their own (docs/contracts.md, "Registries").
"""

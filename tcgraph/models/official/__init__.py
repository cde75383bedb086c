"""The official DiT family (facebookresearch/DiT's parameter layout): the model and its config
registry (`dit`), official checkpoints and state-dict I/O (`checkpoint`)."""

"""The demo models that ship with tcgraph, beyond their weights: the text demo's prompt vocabulary and
prompt encoder (`digits_text`). Both demos load as any model does (`tcgraph.models.load_model`)."""

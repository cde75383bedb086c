"""The demo models that ship with tcgraph, beyond their weights: the text demo's prompt vocabulary and
prompt encoder (`digits_text`), and the FLUX demo's pooled prompt encoder, folder and scheduler
(`digits_flux`). Every demo loads as any model does (`tcgraph.models.load_model`)."""

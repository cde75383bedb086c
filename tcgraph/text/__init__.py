"""Text conditioning, out of the model layer: prompt embeddings with their mask (`embeddings.Text`)
and a diffusers pipeline folder's own text encoder (`pipeline`), read with safetensors only."""

"""Text conditioning, out of the model layer: prompt embeddings with their mask (`embeddings.Text`)
and a diffusers pipeline folder's own text encoders, read with safetensors only: PixArt's T5
(`pipeline`), FLUX's and SD3's CLIP + T5 (`mmdit`)."""

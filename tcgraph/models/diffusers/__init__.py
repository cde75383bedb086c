"""The diffusers families: DiTTransformer2DModel (`dit`) and PixArtTransformer2DModel (`pixart`) as
traceable wrappers that keep diffusers' modules and names, and what is read of a diffusers folder
without diffusers (`config`: configs, parameter shapes, weight files, every path checked)."""

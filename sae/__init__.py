"""headlab.sae: sparse autoencoders on per-head attention outputs."""

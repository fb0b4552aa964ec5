"""SD3 / SD3.5 LoRA: every common file layout mapped onto the MMDiT's own module names (pure, no A1111)."""

"""The SD3-family models: which family a checkpoint is, the MMDiT that runs it, how its keys are named and loaded."""

"""ResNet18, its checkpoints, and one train step / one scoring step. No Ray, no I/O beyond checkpoints."""

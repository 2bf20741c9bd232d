"""Supervised training of force fields on ED forces: the trainer, its settings and the force metrics."""

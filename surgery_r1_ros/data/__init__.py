"""Surgical-VQLA data: the EndoVis loader, synthetic scenes, the training mix and pictures."""

"""disttrain: distributed image-classification training (synchronized LR sweep, one-cycle, GPU augmentation)."""

__version__ = "0.1.0"

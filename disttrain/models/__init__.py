"""Models: building them, their weights, optimizers and parameter groups, and one module per model
family source (torchvision, timm) behind one small interface."""

"""Models: one module per model family source (torchvision.py, timm.py) behind the small interface of
family.py, listed in families.py; building them and their weights and preprocessing (build.py), layer
groups and freezing (groups.py), the optimizer and its decay groups (optim.py), the config checked
against the families (checks.py), and the evaluation forward (forward.py)."""

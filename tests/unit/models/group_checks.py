"""What every layer-group split must satisfy, shared by the tests of the groups and of each family."""

from __future__ import annotations

import torchvision


def each_parameter_once_in_forward_order(model, groups) -> None:
    """Every parameter in exactly one group, the groups in forward order, the head's last."""
    names = [n for g in groups for n in g.names]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each once
    by_name = dict(model.named_parameters())
    assert all(by_name[n] is p for g in groups for n, p in zip(g.names, g.params, strict=True))
    head = groups[-1].blocks[0]
    if type(model) is not torchvision.models.VisionTransformer:  # its conv_proj runs before the class token it holds
        assert names == [n for n, _ in model.named_parameters() if not n.startswith(head + ".")] + [
            n for n, _ in model.named_parameters() if n.startswith(head + ".")]

import pytest
import torch
import torchvision

from disttrain.config import ModelConfig, OptimConfig
from disttrain.models.build import WeightsError, build_model, build_optimizer, decay_groups


def test_head_is_sized_to_the_data_and_channels_last():
    model = build_model(ModelConfig(name="resnet18"), num_classes=7)
    assert model.fc.out_features == 7
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_no_weight_decay_on_norm_and_bias():
    model = build_model(ModelConfig(name="resnet18", channels_last=False), num_classes=3)
    decay, no_decay = decay_groups(model.named_parameters(), 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    ids = {id(p) for p in no_decay["params"]}
    assert id(model.bn1.weight) in ids and id(model.fc.bias) in ids and id(model.fc.weight) not in ids
    sgd = build_optimizer(OptimConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True), model)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"]
    assert isinstance(build_optimizer(OptimConfig(), model), torch.optim.AdamW)


def test_pretrained_loads_body_and_skips_a_head_of_another_size(tmp_path):
    source = torchvision.models.resnet18(num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    model = build_model(ModelConfig(name="resnet18", pretrained=str(tmp_path / "r18.pth")), num_classes=5)
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    assert model.fc.out_features == 5


def test_weights_of_another_architecture_are_refused(tmp_path):
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=10).state_dict(), tmp_path / "m.pth")
    with pytest.raises(WeightsError, match=r"m\.pth: only \d+ of \d+ tensors fit ResNet"):
        build_model(ModelConfig(name="resnet18", pretrained=str(tmp_path / "m.pth")), num_classes=10)
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match=r"junk\.pth: not a loadable state dict"):
        build_model(ModelConfig(name="resnet18", pretrained=str(tmp_path / "junk.pth")), num_classes=10)

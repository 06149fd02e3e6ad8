import pytest
import torch
import torchvision

from disttrain.config import ModelConfig
from disttrain.models.build import WeightsError, build_model


def test_head_is_sized_to_the_data_and_channels_last():
    model = build_model(ModelConfig(name="resnet18"), num_classes=7)
    assert model.fc.out_features == 7
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)


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


def test_a_pretrained_file_of_another_architecture_names_the_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    with pytest.raises(WeightsError, match=r"other\.pt: only 0 of \d+ tensors fit ResNet"):
        build_model(ModelConfig(name="resnet18", pretrained=str(path)), num_classes=2)

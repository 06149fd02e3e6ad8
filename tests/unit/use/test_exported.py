"""What an exported file is fed and carries: the eval view's pixels rounded to uint8, the wrapper's
forward (predict's plain pass), the metadata as ONNX strings and back, the verification batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from disttrain.use.export import ServingModel, verification_pixels
from disttrain.use.exported import eval_pixels, from_props, is_onnx_file, metadata, onnx_props
from disttrain.models.forward import eval_view, outputs


def _squares(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_eval_pixels_are_the_eval_views_resample_rounded_to_uint8(interpolation):
    squares = _squares(3, 40)
    pixels = eval_pixels(squares, 32, interpolation)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 32, 32, 3)
    view = eval_view(32, [0.0] * 3, [1.0] * 3, channels_last=False, interpolation=interpolation)
    resampled = view(squares.permute(0, 3, 1, 2), train=False).permute(0, 2, 3, 1) * 255
    assert (pixels.double() - resampled.double()).abs().max() <= 0.5 + 1e-3  # the nearest integer
    assert (pixels.double() - resampled.double()).abs().max() > 0.1, "a real resample, not a copy"
    assert eval_pixels(squares, 40) is squares  # presized at the image size: nothing resampled, nothing rounded
    with pytest.raises(ValueError, match="expects uint8 \\(B, S, S, 3\\)"):
        eval_pixels(squares.permute(0, 3, 1, 2), 32)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_the_wrapper_computes_predicts_plain_pass_on_presized_squares_and_on_eval_views(interpolation):
    """Fed presized squares (20 px) the wrapper resamples them to 16 px exactly as the eval view does:
    predict's plain pass (to float rounding: here the network runs channels_last); fed the eval
    view's own 16 px it samples each pixel where it is (the same but for the sampling grid's rounding)."""
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    wrapper = ServingModel(network, mean, std, 16, interpolation).eval()
    view = eval_view(16, mean, std, interpolation=interpolation)
    for size in (20, 16):
        pixels = _squares(4, size)
        with torch.no_grad():
            served = wrapper(pixels)
            _, plain, _ = outputs(network, view(pixels.permute(0, 3, 1, 2), train=False), torch.no_grad)
        assert served.shape == (4, 5) and torch.allclose(served.sum(1), torch.ones(4))
        assert torch.allclose(served, plain, atol=1e-6 if size == 20 else 1e-5, rtol=0)


def test_metadata_round_trips_through_onnx_strings():
    state = {"classes": ["ant", "bee"], "arch": "mobilenet_v2", "image_size": 224, "load_size": 256,
             "normalize": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}, "precision": "bf16"}
    meta = metadata(state, dynamic_batch=True, batch_size=1)
    props = onnx_props(meta)
    assert all(isinstance(v, str) for v in props.values()) and props["classes"] == '["ant", "bee"]'
    assert from_props(props) == meta
    assert meta["interpolation"] == "bilinear" and meta["batch_size"] == "dynamic" and meta["input_layout"] == "NHWC uint8 RGB"
    assert metadata(state, dynamic_batch=False, batch_size=8)["batch_size"] == "8"
    assert is_onnx_file("runs/x/model.ONNX") and not is_onnx_file("runs/x/model.pt")


def test_the_verification_batch_is_deterministic_and_varied():
    a, b = verification_pixels(40, 32, 6), verification_pixels(40, 32, 6)
    assert a.dtype == torch.uint8 and a.shape == (6, 32, 32, 3) and torch.equal(a, b)
    assert all(not torch.equal(a[i], a[j]) for i in range(6) for j in range(i + 1, 6))
    assert a.float().std() > 20  # not a flat grey

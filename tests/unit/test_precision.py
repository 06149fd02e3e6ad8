"""`train.precision`: what `auto` resolves to on this machine, and the explicit choices."""

import pytest

from disttrain.config import ConfigError
from disttrain.runtime import cpu_has_native_bf16, resolve_precision


def test_auto_on_the_cpu_is_bf16_only_with_native_bf16():
    chosen = resolve_precision("auto", cuda=False)
    assert chosen.mode == ("bf16" if cpu_has_native_bf16() else "no")
    assert chosen.reason.startswith("auto: ") and chosen.warning is None


def test_explicit_choices_are_kept_and_emulated_bf16_warns_once():
    assert resolve_precision("no", cuda=False).mode == "no"
    bf16 = resolve_precision("bf16", cuda=False)
    assert bf16.mode == "bf16"
    assert (bf16.warning is None) == cpu_has_native_bf16()
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", cuda=False)

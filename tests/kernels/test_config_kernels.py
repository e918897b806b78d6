"""The ``kernels`` switch: what auto picks, what on refuses, and that it is no architecture key."""

from __future__ import annotations

import json

import pytest

from gpt_dist.config import ARCH_KEYS, Config, ConfigError, KernelsConfig, arch_diff, config_from_dict, load_config

ALL_TRITON = ("layernorm", "bias_gelu", "bias_dropout_add", "cross_entropy")


def test_auto_is_the_reference_on_cpu_and_fused_on_cuda_half_precision():
    k = KernelsConfig()
    cpu = k.resolve("cpu", "fp32")
    assert cpu.names_on() == []
    assert k.resolve("cpu", "bf16").names_on() == []
    gpu = k.resolve("cuda", "bf16")
    assert gpu.names_on() == [*ALL_TRITON, "flash_attention", "fused_adam"]  # compile: off until measured
    assert k.resolve("cuda", "fp32").names_on() == ["fused_adam"]             # fp32 GPU runs: the reference
    assert k.resolve("cuda", "bf16", offload=True).fused_adam is False       # ZeRO-Offload: DeepSpeedCPUAdam


def test_off_always_wins_and_on_is_honoured_where_possible(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # on a CPU, Triton kernels need the interpreter
    off = KernelsConfig(**{n: "off" for n in (*ALL_TRITON, "flash_attention", "fused_adam", "compile")})
    assert off.resolve("cuda", "bf16").names_on() == []
    on = KernelsConfig(**{n: "on" for n in ALL_TRITON}, compile="on")
    assert on.resolve("cpu", "fp32").names_on() == [*ALL_TRITON, "compile"]  # tests/kernels: the interpreter


@pytest.mark.parametrize("kw,device,precision,extra,key", [
    ({"layernorm": "on"}, "cpu", "fp32", {}, "kernels.layernorm"),            # no GPU, no interpreter
    ({"flash_attention": "on"}, "cuda", "fp32", {}, "kernels.flash_attention"),
    ({"flash_attention": "on"}, "cpu", "fp32", {"attn_dropout": 0.1}, "kernels.flash_attention"),
    ({"fused_adam": "on"}, "cuda", "bf16", {"offload": True}, "kernels.fused_adam"),
])
def test_on_that_cannot_run_is_one_line_naming_the_key(monkeypatch, kw, device, precision, extra, key):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError) as err:
        KernelsConfig(**kw).resolve(device, precision, **extra)
    assert str(err.value).startswith(key + ":") and "\n" not in str(err.value)


def test_section_is_strict_and_not_architecture(tmp_path):
    assert not {"kernels", *KernelsConfig.__dataclass_fields__} & set(ARCH_KEYS)
    with pytest.raises(ConfigError, match=r"kernels\.layernom: unknown key"):
        config_from_dict({"kernels": {"layernom": "on"}})
    with pytest.raises(ConfigError, match=r"kernels\.cross_entropy: must be one of"):
        config_from_dict({"kernels": {"cross_entropy": "yes"}})
    with pytest.raises(ConfigError, match=r"kernels\.ce_chunk_tokens"):
        config_from_dict({"kernels": {"ce_chunk_tokens": 0}})
    a = config_from_dict({"kernels": {"layernorm": "on", "fused_adam": "off"}})
    assert arch_diff(Config().to_dict()["model"], a.model) == []  # a resume compares no kernel key
    path = tmp_path / "c.json"
    path.write_text(json.dumps(a.to_dict()))
    assert load_config(path).kernels == a.kernels                   # load -> dump -> load

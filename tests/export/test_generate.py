"""Generation with the KV cache: greedy equals transformers' generate; sampling is seeded."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests import helpers

from .conftest import ROOT, native_state, random_model, small_cfg


@pytest.fixture(scope="module")
def exports(ctx, tmp_path_factory):
    out = {}
    for arch in ("gpt2", "gpt1"):
        from gpt_dist.export import export_state

        cfg = small_cfg(arch, n_ctx=48)
        state = native_state(random_model(cfg, seed=3), cfg)
        root = tmp_path_factory.mktemp(f"gen_{arch}")
        export_state(state, cfg, root / "native", "native")
        export_state(state, cfg, root / "hf", "hf")
        out[arch] = root
    return out


@pytest.mark.parametrize("arch", ["gpt2", "gpt1"])
def test_greedy_equals_transformers_generate(exports, arch):
    from transformers import AutoModelForCausalLM

    from gpt_dist.generate import generate, load_model

    loaded = load_model(exports[arch] / "native")
    prompt = [5, 17, 42, 7, 99, 250, 3]
    ours = generate(loaded, prompt, max_new_tokens=20, temperature=0.0)[0]
    hf = AutoModelForCausalLM.from_pretrained(exports[arch] / "hf").eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                          pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == ref
    # the KV cache changes nothing: the same 20 tokens without it
    from gpt_dist.generate import generate_ids

    no_cache = [int(t) for t in generate_ids(loaded.model, loaded.cfg, torch.tensor([prompt]), 20,
                                             temperature=0.0, use_cache=False)]
    assert no_cache == ours


def test_sampling_is_seeded_and_filters(exports):
    from gpt_dist.generate import filter_logits, generate, load_model

    loaded = load_model(exports["gpt2"] / "native")
    a = generate(loaded, [1, 2, 3], 15, num_samples=2, temperature=0.9, top_k=20, top_p=0.9, seed=4)
    b = generate(loaded, [1, 2, 3], 15, num_samples=2, temperature=0.9, top_k=20, top_p=0.9, seed=4)
    assert a == b and a[0] != a[1]
    # past the context (48): the sliding window keeps going
    long = generate(loaded, list(range(40)), 30, temperature=0.0)[0]
    assert len(long) == 30
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert torch.isinf(filter_logits(logits, top_k=2))[0].tolist() == [True, True, False, False]
    p = torch.softmax(logits, -1)[0]  # 0.64, 0.24, ...: top_p 0.7 keeps the two largest
    assert p[3] < 0.7 < p[3] + p[2]
    assert torch.isinf(filter_logits(logits, top_p=0.7))[0].tolist() == [True, True, False, False]


def test_cli_streams_token_ids(exports):
    import os

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    res = subprocess.run(check=False, args=[sys.executable, "launch/generate.py", "--model", str(exports["gpt2"] / "hf"),
                          "--prompt-ids", "5,17,42", "--max-new-tokens", "6", "--temperature", "0"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    ids = [int(x) for x in res.stdout.split()]
    assert ids[:3] == [5, 17, 42] and len(ids) == 9


@pytest.mark.slow
def test_tp2_generation_streams_the_tp1_tokens(exports):
    """torchrun --nproc-per-node 2: the export sliced into the TP=2 GPT; rank 0 prints the
    greedy tokens of the one-process run (and of transformers)."""
    args = [ROOT / "launch" / "generate.py", "--model", exports["gpt2"] / "native", "--prompt-ids", "5,17,42,7",
            "--max-new-tokens", "12", "--temperature", "0", "--no-stop"]
    res = helpers.run(helpers.torchrun_cmd(*args, nproc=2), env=helpers.child_env(GPT_DIST_PG_TIMEOUT="120"),
                      timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    tp2 = [int(x) for x in res.stdout.split()]
    from gpt_dist.generate import generate, load_model

    ref = generate(load_model(exports["gpt2"] / "native"), [5, 17, 42, 7], 12, temperature=0.0, eos_id=None)[0]
    assert tp2 == [5, 17, 42, 7, *ref]

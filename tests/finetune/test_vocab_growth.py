"""Starting fine-tuning from a pretrained export with GPT-2's 50,257 rows grows the token
embedding to 50,260 (start, delimiter, extract appended): the old rows are the export's, the
new ones the model's own seeded N(0, 0.02) initialisation, the TP padding rows zero."""

from __future__ import annotations

import pytest
import torch

from tests import helpers


def _model(vocab: int):
    from gpt_dist.config import ModelConfig
    from gpt_dist.model.build import build_gpt
    from gpt_dist.model.heads import TaskHeadSpec

    cfg = ModelConfig(arch="gpt2", n_layer=1, n_head=2, n_embd=16, n_ctx=16, vocab_size=vocab,
                      dropout=0.0, attn_dropout=0.0)
    return cfg, build_gpt(cfg, seed=5, task=TaskHeadSpec("multiple_choice", 1))


def test_export_with_50257_rows_loads_into_50260():
    from gpt_dist.export import expected_shapes, load_state_into_model

    with helpers.tp1_without_groups():
        small_cfg, _ = _model(50257)
        cfg, model = _model(50260)
        own = model.embed.wte.weight.detach().clone()           # [50304 padded, 16]
        g = torch.Generator().manual_seed(1)
        state = {k: torch.randn(s, generator=g) for k, s in expected_shapes(small_cfg).items()}
        loaded = load_state_into_model(model, state, None, cfg, grow_vocab=True)
    wte = model.embed.wte.weight.detach()
    assert wte.shape[0] == cfg.padded_vocab_size(1) == 50304
    assert torch.equal(wte[:50257], state["wte.weight"])               # the old rows, unchanged
    assert torch.equal(wte[50257:50260], own[50257:50260])             # the new rows: seeded init
    assert 0.01 < wte[50257:50260].std().item() < 0.04                 # N(0, 0.02)
    assert torch.count_nonzero(wte[50260:]) == 0                       # padding rows
    assert "task_head.linear.weight" not in loaded                     # the head keeps its init
    assert torch.equal(model.embed.wpe.weight.detach(), state["wpe.weight"])


def test_growth_only_when_fine_tuning():
    from gpt_dist.export import ExportError, expected_shapes, load_state_into_model

    with helpers.tp1_without_groups():
        small_cfg, _ = _model(50257)
        cfg, model = _model(50260)
        state = {k: torch.zeros(s) for k, s in expected_shapes(small_cfg).items()}
        with pytest.raises(ExportError, match="only fine-tuning grows the vocabulary"):
            load_state_into_model(model, state, None, cfg)

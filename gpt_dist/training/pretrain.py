"""``pretrain(cfg)``: everything ``launch/pretrain.py`` does after parsing.

    validate the config; the tokenizer's vocabulary size, end-of-document id, fingerprint
    training session (training/session.py): context, seeds, run directory, logger
        -> data (megatron-core GPTDataset over data.prefixes, checked against the tokenizer)
        -> engine -> checkpoint.init_from -> resume -> the loop with ``LMObjective``
"""

from __future__ import annotations

import os

from gpt_dist.config import Config, validate
from gpt_dist.parallel import ParallelContext
from gpt_dist.tokenizer import load_tokenizer
from gpt_dist.training.data import build_datasets
from gpt_dist.training.hooks import TrainHooks
from gpt_dist.training.loop import TrainState
from gpt_dist.training.objective import LMObjective
from gpt_dist.training.session import training_session


def load_tokenizer_info(cfg: Config) -> tuple[int, int, str]:
    """(vocab size, end-of-document id, fingerprint) of the run's tokenizer."""
    tok = load_tokenizer(cfg.data.tokenizer)
    return tok.vocab_size, tok.eod_id, tok.fingerprint


def pretrain(cfg: Config, ctx: ParallelContext | None = None, hooks: TrainHooks | None = None) -> TrainState:
    """Pretrain; returns the final train state.

    ``ctx``: an existing parallel context (else one is built from the launcher's environment
    and destroyed at the end); ``hooks``: see ``gpt_dist.training.hooks`` (default: none)."""
    validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    vocab, eod, fingerprint = load_tokenizer_info(cfg)
    if vocab > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size: {cfg.model.vocab_size} < tokenizer vocabulary {vocab}")
    with training_session(cfg, fingerprint, ctx, hooks) as s:
        datasets = build_datasets(cfg, s.ctx, vocab, eod, fingerprint)
        s.start()
        return s.train(LMObjective(cfg, s.ctx, datasets))

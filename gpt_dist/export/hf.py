"""Hugging Face interchange: weight/config mapping and tokenizer files for ``--format hf``.

Weights: GPT2LMHeadModel (gpt2) or OpenAIGPTLMHeadModel (gpt1). Conv1D weights are
[in, out] (our Linear is [out, in]) and c_attn's output rows are q|k|v (ours are grouped by
head: (head, {q,k,v}, head_dim)).

Tokenizer: the export gets a ``tokenizer.json`` + ``tokenizer_config.json`` that
``AutoTokenizer.from_pretrained(dir)`` loads offline with ids equal to ``gpt_dist.tokenizer``'s:

* ``sentencepiece`` (BPE, identity normalization, byte fallback): a ``tokenizers`` BPE with
  the model's pieces and merges (every split of a piece into two pieces, ranked by the merged
  piece's id, which is sentencepiece's BPE order), a normalizer ``Prepend("▁")`` (the dummy
  prefix) + ``Replace(" ", "▁")`` and no pre-tokenizer (a ``Metaspace`` pre-tokenizer would
  differ for text starting with a space), byte-fallback decoding. Saved through
  ``PreTrainedTokenizerFast`` so the file is used as is (see HF_INTERCHANGE.md).
* ``gpt2_bpe`` / ``tiktoken``: GPT-2's byte-level BPE (``vocab.json`` + ``merges.txt`` +
  ``tokenizer.json``), class ``GPT2TokenizerFast``.

Special tokens: eos = bos = ``<|endoftext|>`` (no BOS is added when encoding), and
``<|start|>``, ``<|delimiter|>``, ``<|extract|>`` as additional special tokens with the
project's ids. ``split_special_tokens`` is on: like the project's tokenizer, text that
contains the string ``<|endoftext|>`` encodes as ordinary pieces, never as the special id
(special ids are inserted by id, as the training pipeline does).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from gpt_dist.config import ModelConfig
from gpt_dist.export.names import ExportError
from gpt_dist.tokenizer import SPECIAL_TOKENS

# --------------------------------------------------------------------------- weights & config


def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Native names/layout -> GPT2LMHeadModel (gpt2) or OpenAIGPTLMHeadModel (gpt1) weights."""
    nh, hd, h = cfg.n_head, cfg.head_dim, cfg.n_embd
    out: dict[str, torch.Tensor] = {}
    emb = {"wte.weight": "tokens_embed.weight", "wpe.weight": "positions_embed.weight"} if cfg.arch == "gpt1" else {}
    for name, t in state.items():
        key = "transformer." + emb.get(name, name)
        if name.endswith("attn.c_attn.weight"):           # rows (head, qkv, hd) -> (qkv, head, hd)
            t = t.reshape(nh, 3, hd, h).transpose(0, 1).reshape(3 * h, h)
        elif name.endswith("attn.c_attn.bias"):
            t = t.reshape(nh, 3, hd).transpose(0, 1).reshape(3 * h)
        if t.dim() == 2 and re.search(r"\.(c_attn|c_proj|c_fc)\.weight$", name):
            t = t.t()                                     # Linear [out, in] -> Conv1D [in, out]
        if name.startswith("task_head.linear."):           # GPT-1's W_y = DoubleHeads' mc head
            key = "multiple_choice_head.summary." + name.removeprefix("task_head.linear.")
        out[key] = t.contiguous()
    return out
def from_hf(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of ``to_hf`` (also reads original GPT-2 / OpenAI GPT checkpoints)."""
    nh, hd, h = cfg.n_head, cfg.head_dim, cfg.n_embd
    emb = {"tokens_embed.weight": "wte.weight", "positions_embed.weight": "wpe.weight"}
    out: dict[str, torch.Tensor] = {}
    for key, t in hf.items():
        name = key.removeprefix("transformer.")
        if name.startswith("multiple_choice_head.summary."):  # GPT2DoubleHeadsModel's mc head
            out["task_head.linear." + name.removeprefix("multiple_choice_head.summary.")] = t.contiguous()
            continue
        if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue                                      # tied head / causal-mask buffers
        name = emb.get(name, name)
        if t.dim() == 2 and re.search(r"\.(c_attn|c_proj|c_fc)\.weight$", name):
            t = t.t()
        if name.endswith("attn.c_attn.weight"):
            t = t.reshape(3, nh, hd, h).transpose(0, 1).reshape(3 * h, h)
        elif name.endswith("attn.c_attn.bias"):
            t = t.reshape(3, nh, hd).transpose(0, 1).reshape(3 * h)
        out[name] = t.contiguous()
    return out


def hf_config(cfg: ModelConfig, eod_id: int | None, task: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json for transformers (dropouts as trained; evaluation uses eval()).

    A multiple-choice head (``task``) makes it a DoubleHeads model: the summary is the
    ``cls_index`` token's state (our extract token, ``mc_token_ids``) through dropout and
    one linear output, exactly GPT-1's W_y."""
    common = {"vocab_size": cfg.vocab_size, "n_positions": cfg.n_ctx, "n_embd": cfg.n_embd,
                  "n_layer": cfg.n_layer, "n_head": cfg.n_head, "layer_norm_epsilon": cfg.ln_eps,
                  "initializer_range": cfg.init_std, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
                  "attn_pdrop": cfg.attn_dropout, "bos_token_id": eod_id, "eos_token_id": eod_id,
                  "tie_word_embeddings": True}
    summary: dict[str, Any] = {}
    if task is not None:
        summary = {"summary_type": "cls_index", "summary_use_proj": True, "summary_proj_to_labels": True,
                   "summary_activation": None, "summary_first_dropout": float(task["dropout"]),
                   "num_labels": 1}
    if cfg.arch == "gpt2":
        from transformers import GPT2Config

        c = GPT2Config(activation_function="gelu_new", n_inner=4 * cfg.n_embd, **common, **summary)
        c.architectures = ["GPT2DoubleHeadsModel" if task else "GPT2LMHeadModel"]
    else:
        from transformers import OpenAIGPTConfig

        c = OpenAIGPTConfig(afn="gelu", **common, **summary)  # OpenAI GPT's "gelu" is the tanh approximation
        c.architectures = ["OpenAIGPTDoubleHeadsModel" if task else "OpenAIGPTLMHeadModel"]
    return c.to_dict()



# --------------------------------------------------------------------------- tokenizer


def _error(msg: str) -> Exception:
    return ExportError(msg)


def _sentencepiece_engine(model_file: Path) -> Any:
    """A ``tokenizers.Tokenizer`` that encodes exactly as the sentencepiece BPE model."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    proto = pb.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if spec.model_type != pb.TrainerSpec.BPE:
        raise _error(f"{model_file}: only sentencepiece BPE models convert to Hugging Face here "
                     f"(model_type {spec.model_type})")
    if norm.name != "identity" or norm.remove_extra_whitespaces or not norm.escape_whitespaces \
            or spec.treat_whitespace_as_suffix:
        raise _error(f"{model_file}: sentencepiece normalization {norm.name!r} (remove_extra_whitespaces="
                     f"{norm.remove_extra_whitespaces}) has no faithful Hugging Face equivalent; "
                     "train with identity normalization (data_tools/train_tokenizer.py)")
    normal = pb.ModelProto.SentencePiece.NORMAL
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    mergeable = {p.piece for p in proto.pieces if p.type == normal}
    # sentencepiece BPE applies the merge whose result has the best score, i.e. the lowest id
    merges = []
    for piece, pid in vocab.items():
        if piece not in mergeable:
            continue
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in mergeable and right in mergeable:
                merges.append((pid, vocab[left], vocab[right], left, right))
    merges.sort()
    engine = Tokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges],
                                  unk_token=spec.unk_piece, fuse_unk=True, byte_fallback=spec.byte_fallback,
                                  dropout=None))
    steps = [normalizers.Prepend("▁")] if norm.add_dummy_prefix else []
    engine.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1))
    engine.decoder = decoders.Sequence(dec)
    special = {pb.ModelProto.SentencePiece.CONTROL, pb.ModelProto.SentencePiece.UNKNOWN}
    engine.add_special_tokens([AddedToken(p.piece, normalized=False, special=True)
                               for p in proto.pieces if p.type in special])
    engine.add_tokens([AddedToken(p.piece, normalized=False)
                       for p in proto.pieces if p.type == pb.ModelProto.SentencePiece.USER_DEFINED])
    return engine, spec.unk_piece


def _special_kwargs(tok: Any) -> dict[str, Any]:
    eod = SPECIAL_TOKENS["eod"]
    return {"eos_token": eod, "bos_token": eod,
                "additional_special_tokens": [SPECIAL_TOKENS[k] for k in ("start", "delimiter", "extract")],
                "clean_up_tokenization_spaces": False, "split_special_tokens": True}


def write_hf_tokenizer(tok: Any, out: Path, model_max_length: int | None = None) -> list[str]:
    """Write Hugging Face tokenizer files for a ``gpt_dist.tokenizer.Tokenizer`` into ``out``.

    Returns the file names written. Raises ExportError when the ids would not match."""
    out = Path(out)
    if tok.kind == "sentencepiece":
        from transformers import PreTrainedTokenizerFast

        engine, unk = _sentencepiece_engine(Path(tok.model_file))
        hf = PreTrainedTokenizerFast(tokenizer_object=engine, unk_token=unk, **_special_kwargs(tok))
    elif tok.kind in ("gpt2_bpe", "tiktoken"):
        from tokenizers import AddedToken, processors
        from transformers import GPT2TokenizerFast

        engine = type(tok._engine).from_str(tok._engine.to_str())  # a copy of the project's BPE
        engine.post_processor = processors.ByteLevel(trim_offsets=False)
        for name in ("eod", "start", "delimiter", "extract"):     # in id order
            # a token in the vocabulary keeps its id (GPT-2's 50256); a new one goes to the end
            engine.add_special_tokens([AddedToken(SPECIAL_TOKENS[name], normalized=False, special=True)])
        hf = GPT2TokenizerFast(tokenizer_object=engine, unk_token=None, add_prefix_space=False,
                               **_special_kwargs(tok))
        got = {n: hf.convert_tokens_to_ids(SPECIAL_TOKENS[n]) for n in tok.special_ids}
        if got != tok.special_ids:
            raise _error(f"{out}: Hugging Face special token ids {got} differ from the tokenizer's {tok.special_ids}")
    else:
        raise _error(f"{out}: no Hugging Face conversion for tokenizer kind {tok.kind!r}")
    if model_max_length:
        hf.model_max_length = int(model_max_length)
        hf.init_kwargs["model_max_length"] = int(model_max_length)
    written = sorted({Path(f).name for f in hf.save_pretrained(str(out)) if Path(f).is_file()})
    _check_hf_tokenizer(tok, out)
    return written


SAMPLE_TEXTS = ("Hello world", " leading space", "two  spaces and\ttab\nnew line\n\n", "café naïve 東京 🙂",
                "x = f(a, b) + 42;  # comment", "  ", "\n", "trailing space ")


def _check_hf_tokenizer(tok: Any, out: Path) -> None:
    """Reload the written files and compare ids on a few hard strings (fails loudly)."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out))
    for text in SAMPLE_TEXTS:
        want, got = tok.encode(text), hf.encode(text, add_special_tokens=False)
        if want != got:
            raise _error(f"{out}: Hugging Face tokenizer ids differ from the project's on {text!r}: "
                         f"{got[:12]} != {want[:12]}")
    if hf.eos_token_id != tok.eod_id:
        raise _error(f"{out}: Hugging Face eos id {hf.eos_token_id} != end-of-document id {tok.eod_id}")


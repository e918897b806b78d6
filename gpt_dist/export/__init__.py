"""Export a training checkpoint to one safetensors file, and load exports back, in any layout.

A checkpoint is DeepSpeed's files for one parallel layout (TP shards, pipeline layer files,
ZeRO partitions). An *export* is the model alone, whole, with GPT-2 names::

    EXPORT_DIR/model.safetensors   full tensors (TP shards merged, vocabulary padding stripped)
    EXPORT_DIR/config.json         native: {"format": "gpt_dist-native", "model": {...},
                                   "training_config": {...}, "eod_id": N};  hf: the
                                   transformers config (GPT2LMHeadModel / OpenAIGPTLMHeadModel)
    EXPORT_DIR/export.json         step, tokens seen, validation loss, source checkpoint/layout
    EXPORT_DIR/<tokenizer files>   copied from the run's data.tokenizer directory, if any

Native tensor names and layout are those of a TP=1 ``GPT`` with the module prefixes
(``embed.``, ``head.``) dropped: ``wte.weight`` [vocab, h], ``wpe.weight``,
``h.N.ln_1.weight``, ``h.N.attn.c_attn.weight`` [3h, h] (torch Linear [out, in], rows ordered
(head, {q,k,v}, head_dim) as in the model), ..., ``ln_f.weight`` (GPT-2 only).

TP merge rules (megatron-core layers): column-parallel weights/biases (c_attn, c_fc) and the
vocab-parallel ``wte`` are concatenated along dim 0; row-parallel weights (attn/mlp c_proj)
along dim 1; everything else (wpe, LayerNorms, row-parallel biases) is replicated.

Hugging Face: ``--format hf`` writes GPT2LMHeadModel (gpt2) or OpenAIGPTLMHeadModel (gpt1)
weights: Conv1D weights are [in, out] (transposed) and c_attn's output is reordered to q|k|v.
``load_native`` reads either kind of directory back to native names.

Every file is opened safely: checkpoint files with ``torch.load(weights_only=True)`` after
``checkpoint.verify`` accepted the manifest, exports through safetensors only. Problems are
``ExportError`` with one line that names the file (and the tensor).
"""

from gpt_dist.export.hf import from_hf, hf_config, to_hf
from gpt_dist.export.loader import (
    load_export,
    load_native,
    load_state_into_model,
    read_safetensors,
)
from gpt_dist.export.names import (
    CONFIG,
    DTYPES,
    EXPORT_INFO,
    NATIVE_FORMAT,
    WEIGHTS,
    ExportError,
    canonical_name,
    check_state,
    expected_shapes,
    model_config_from_dict,
    module_name,
    tp_dim,
)
from gpt_dist.export.reader import _Merger, gather_checkpoint, resolve_checkpoint
from gpt_dist.export.writer import export_checkpoint, export_state

__all__ = [
    "CONFIG",
    "DTYPES",
    "EXPORT_INFO",
    "NATIVE_FORMAT",
    "WEIGHTS",
    "ExportError",
    "_Merger",
    "canonical_name",
    "check_state",
    "expected_shapes",
    "export_checkpoint",
    "export_state",
    "from_hf",
    "gather_checkpoint",
    "hf_config",
    "load_export",
    "load_native",
    "load_state_into_model",
    "model_config_from_dict",
    "module_name",
    "read_safetensors",
    "resolve_checkpoint",
    "to_hf",
    "tp_dim",
]

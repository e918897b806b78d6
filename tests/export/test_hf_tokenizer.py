"""--format hf writes tokenizer files: AutoTokenizer loads them offline with the project's ids."""

from __future__ import annotations

import json

import pytest

from .conftest import native_state, random_model, small_cfg

VARIED = [
    "Hello world. The quick brown fox jumps over the lazy dog.",
    " leading space, then  two spaces,\ttab and\nnew lines\n\n",
    "   ",
    "\n",
    "trailing space ",
    "café naïve résumé — 東京 Ω≈ç√ 🙂🙂 (emoji), ünïcödé",
    "def f(x):\n    return x ** 2  # code\r\n",
    "text with <|endoftext|> and <|start|> written out <unk>",
    "numbers 1234567890 3.14159 1e-6",
]


def _corpus(path):
    lines = []
    for i in range(150):
        lines.append(f"Line {i}: the quick brown fox jumps over the lazy dog. Café naïve résumé.\n"
                     f"\tindent {i * 7}  double  spaces, def f(x): return x + {i}\n")
    path.write_text("".join(lines))
    return path


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    from gpt_dist.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("sp")
    train_tokenizer([str(_corpus(root / "corpus.txt"))], 400, root / "tok")
    return root / "tok"


@pytest.fixture(scope="module")
def gpt2_tok(tmp_path_factory):
    """A toy GPT-2 BPE: encoder.json + vocab.bpe with <|endoftext|> last, as GPT-2's files."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("g2")
    text = _corpus(root / "corpus.txt").read_text().splitlines(keepends=True)
    eng = Tokenizer(models.BPE())
    eng.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    eng.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(eng.to_str())["model"]
    vocab = dict(model["vocab"])
    vocab["<|endoftext|>"] = len(vocab)
    (root / "tok").mkdir()
    (root / "tok" / "encoder.json").write_text(json.dumps(vocab))
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (root / "tok" / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return root / "tok"


@pytest.mark.parametrize("kind", ["sentencepiece", "gpt2_bpe"])
def test_hf_tokenizer_ids_equal_ours(ctx, sp_tok, gpt2_tok, tmp_path, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpt_dist.export import export_state
    from gpt_dist.tokenizer import load_tokenizer

    tok_dir = sp_tok if kind == "sentencepiece" else gpt2_tok
    tok = load_tokenizer(tok_dir)
    assert tok.kind == kind
    cfg = small_cfg("gpt2" if kind == "gpt2_bpe" else "gpt1", vocab_size=tok.vocab_size)
    export_state(native_state(random_model(cfg), cfg), cfg, tmp_path / "hf", "hf", tokenizer_dir=tok_dir)
    names = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert "tokenizer.json" in names and "tokenizer_config.json" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]
    info = json.loads((tmp_path / "hf" / "export.json").read_text())
    assert "tokenizer.json" in info["hf_tokenizer"]["files"] and info["hf_tokenizer"]["kind"] == kind

    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.eos_token_id == tok.eod_id and hf.bos_token_id == tok.eod_id
    ids = {n: hf.convert_tokens_to_ids(t) for n, t in
           {"start": "<|start|>", "delimiter": "<|delimiter|>", "extract": "<|extract|>"}.items()}
    assert ids == {n: tok.special_ids[n] for n in ids}
    for text in VARIED:
        assert hf.encode(text) == tok.encode(text), text        # no BOS added, specials split
        assert hf.decode(tok.encode(text)) == tok.decode(tok.encode(text)), text
    whole = "".join(VARIED)
    assert hf(whole)["input_ids"] == tok.encode(whole)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.config.eos_token_id == tok.eod_id and model.config.vocab_size == tok.vocab_size


def test_native_export_has_no_hf_tokenizer_and_fake_tokenizer_is_skipped(ctx, sp_tok, tmp_path):
    from gpt_dist.export import export_state

    cfg = small_cfg(vocab_size=400)
    state = native_state(random_model(cfg), cfg)
    export_state(state, cfg, tmp_path / "n", "native", tokenizer_dir=sp_tok)
    assert not (tmp_path / "n" / "tokenizer.json").exists() and (tmp_path / "n" / "tokenizer.model").exists()
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "vocab.txt").write_text("not a tokenizer\n")
    export_state(state, cfg, tmp_path / "h", "hf", tokenizer_dir=fake)   # weights still exported
    info = json.loads((tmp_path / "h" / "export.json").read_text())
    assert info["hf_tokenizer"]["files"] == [] and "skipped" in info["hf_tokenizer"]


def test_hf_check_script_loads_the_export(ctx, sp_tok, tmp_path, capsys):
    """launch/hf_check.py (make demo's Hugging Face step): transformers' greedy continuation
    equals launch/generate.py's on the same directory."""
    import importlib.util

    from gpt_dist.export import export_state
    from gpt_dist.tokenizer import load_tokenizer

    from .conftest import ROOT

    cfg = small_cfg(vocab_size=load_tokenizer(sp_tok).vocab_size, n_ctx=48)
    export_state(native_state(random_model(cfg, seed=4), cfg), cfg, tmp_path / "hf", "hf", tokenizer_dir=sp_tok)
    spec = importlib.util.spec_from_file_location("hf_check", ROOT / "launch" / "hf_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--model", str(tmp_path / "hf"), "--prompt", "Line 3: the quick", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "GPT2LMHeadModel" in out and "greedy: Line 3: the quick" in out
    assert "same prompt ids as gpt_dist's tokenizer: True; same continuation as launch/generate.py: True" in out

"""DeepSpeed's internals are reached only through ``gpt_dist/deepspeed_compat.py``.

Every private attribute, patch and registration the project relies on lives there, each with a
test in tests/test_deepspeed_compat.py that fails when the installed DeepSpeed changes it. Code
elsewhere in ``gpt_dist/`` that reached in directly would escape those tests, so this one scans
the sources (like tests/test_no_test_hooks.py) for:

* an underscore attribute that DeepSpeed's own sources define (``self._x =``, ``def _x``) and
  the project does not: ``engine._global_grad_norm``, ``opt._dummy_overflow_buf``,
  ``zero_to_fp32._zero3_merge_trainable_params``, ``self._x`` in a subclass of a DeepSpeed
  class, whatever the variable is called;
* a private name imported from DeepSpeed or reached on a DeepSpeed module path
  (``from deepspeed.x import _y``, ``deepspeed.ops.__compatible_ops__``);
* DeepSpeed internals without an underscore that the compat module wraps (``forward_funcs``,
  ``checkpoint_engine``, ``ZERO_SUPPORTED_OPTIMIZERS``, ...), and replacing an optimizer's or
  engine's method by assignment (``optimizer.step = ...``).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gpt_dist"
COMPAT = PACKAGE / "deepspeed_compat.py"

#: Internals without an underscore, each wrapped by a deepspeed_compat function.
INTERNAL = {
    r"\.forward_funcs\b": "pipeline_layers",
    r"\.loss_fn\b": "pipeline_loss_fn",
    r"\bcheckpoint_engine\b": "checkpoint_writes_through",
    r"\bclip_fp32_gradients\b": "keep_fp32_clip_norm",
    r"\bZERO_SUPPORTED_OPTIMIZERS\b": "register_zero_optimizer",
    r"\b__compatible_ops__\b": "skip_shm_comm_build",
    r"\brefresh_fp32_params\b": "refresh_fp32_master_weights",
    r"\bcur_scale\b|\bloss_scale_config\b": "loss_scale",
    r"\bmulti_tensor_applier\b|\bmulti_tensor_adam\b": "fused_adam_apply",
    r"\bzero_to_fp32\b.*\b_zero[23]_merge": "zero3_merge_params / zero2_merge_params",
}
#: Replacing a method on another object (a monkey-patch): ``x.step = ...``, ``x.save = ...``
#: (a class setting its own attribute ``self.step = 3`` is not one).
PATCH = re.compile(r"^\s*(?!self\.\w+\s*=)[\w.]+\.(step|save|backward|clip_fp32_gradients|forward)\s*=[^=]")
DS_PRIVATE_PATH = re.compile(r"\bdeepspeed(?:\.\w+)*\.(_\w+)")
DS_PRIVATE_IMPORT = re.compile(r"^\s*from\s+deepspeed[\w.]*\s+import\s+(.*)$")
ATTR = re.compile(r"\.(_[A-Za-z]\w*)\b")
#: The same reached by name: ``getattr(module, "loss_fn", None)``, ``hasattr(opt, "_x")``.
BY_NAME = re.compile(r"\b(?:getattr|hasattr|setattr|delattr)\(\s*[^,]+,\s*[\"'](\w+)[\"']")

#: Call sites in files another change is rewriting; each must still exist (so the entry is
#: removed once it is gone) and is to call the compat function named in the message.
PENDING: dict[tuple[str, str], str] = {}  # (file, snippet) -> its compat call, while a use awaits rewriting


def _defined_names(files: list[Path]) -> set[str]:
    """Underscore names a set of sources defines: ``self._x =``, ``def _x``, ``_x: T`` / ``_x =``."""
    out: set[str] = set()
    pat = re.compile(r"self\.(_[A-Za-z]\w*)\s*(?::[^=]*)?=[^=]|\bdef\s+(_[A-Za-z]\w*)|^\s*(_[A-Za-z]\w*)\s*[:=]",
                     re.MULTILINE)
    for path in files:
        for m in pat.finditer(path.read_text(errors="replace")):
            out.add(next(g for g in m.groups() if g))
    return out


def _deepspeed_private_names() -> set[str]:
    spec = importlib.util.find_spec("deepspeed")  # its location, without importing it
    assert spec is not None and spec.origin, "DeepSpeed is not installed"
    files = sorted(Path(spec.origin).parent.rglob("*.py"))
    assert len(files) > 200, f"only {len(files)} DeepSpeed sources found"
    return _defined_names(files)


def _hits(package: Path = PACKAGE) -> list[str]:
    """Every offending line of ``package`` (its ``deepspeed_compat.py`` excepted)."""
    sources = sorted(p for p in package.rglob("*.py")
                     if p.name != COMPAT.name and "__pycache__" not in p.parts)
    assert len(sources) > 50, f"only {len(sources)} files scanned: wrong root {package}?"
    private = _deepspeed_private_names() - _defined_names(sources)
    assert {"_global_grad_norm", "_dummy_overflow_buf", "_zero3_merge_trainable_params"} <= private
    hits: list[str] = []
    for path in sources:
        rel = str(path.relative_to(package.parent))
        for no, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            code = line.split("#", 1)[0]
            if code.strip().startswith(("\"", "'")) or "``" in code:
                continue  # docstring text naming an attribute
            why = [f"DeepSpeed private attribute {m}" for m in ATTR.findall(code) if m in private]
            why += [f"DeepSpeed private path {m}" for m in DS_PRIVATE_PATH.findall(code)]
            imp = DS_PRIVATE_IMPORT.match(code)
            if imp and re.search(r"\b_\w+", imp.group(1)):
                why.append("private name imported from DeepSpeed")
            why += [f"DeepSpeed internal (use deepspeed_compat.{fn})" for pat, fn in INTERNAL.items()
                    if re.search(pat, code)]
            for name in BY_NAME.findall(code):
                if name in private or any(re.search(pat, "." + name) for pat in INTERNAL):
                    why.append(f"DeepSpeed internal {name} reached by name")
            if PATCH.match(code):
                why.append("method replaced by assignment (a patch belongs in deepspeed_compat)")
            if why and not any(rel == f and s in code for f, s in PENDING):
                hits.append(f"{rel}:{no}: {line.strip()}  <- {'; '.join(sorted(set(why)))}")
    return hits


def test_deepspeed_internals_only_in_the_compat_module():
    hits = _hits()
    assert hits == [], "\n".join(hits)


def test_pending_call_sites_still_exist():
    """Each PENDING entry names a line that still needs rewriting; remove it once it is gone."""
    for (rel, snippet), fix in PENDING.items():
        path = ROOT / rel
        assert path.is_file() and snippet in path.read_text(), (
            f"{rel} no longer has {snippet!r}: remove its PENDING entry (it now calls {fix}?)")


def test_the_scan_sees_what_it_must_refuse(tmp_path):
    """The patterns catch each kind of direct use (a scan that finds nothing proves nothing)."""
    bad = tmp_path / "gpt_dist"
    bad.mkdir()
    lines = ["eng.ds._global_grad_norm = 1.0", "opt = self._dummy_overflow_buf",
             "z._zero3_merge_trainable_params(out, 2, g, s)", "deepspeed.ops.__compatible_ops__['x'] = False",
             "from deepspeed.utils.zero_to_fp32 import _zero2_merge_trainable_params",
             "heads = module.forward_funcs", "ce = engine.checkpoint_engine", "optimizer.step = guarded", "self.optimizer.step = guarded",
             "ZERO_SUPPORTED_OPTIMIZERS.append(C)", 'f = getattr(eng.ds.module, "loss_fn", None)',
             'if hasattr(opt, "_global_grad_norm"):', "scale = eng.ds.optimizer.cur_scale"]
    (bad / "bad.py").write_text("\n".join(lines) + "\n")
    for i in range(60):
        (bad / f"ok{i}.py").write_text("x = 1\n")
    hits = _hits(bad)
    assert len(hits) == len(lines), "\n".join(hits)

"""Structure the docs promise, checked (docs/architecture.md).

* the layers: every import of the project's own modules in ``gpt_dist/`` (function-local
  ones included) goes from a layer to the same or a lower one, and applications do not import
  each other, with the one documented exception (docs/architecture.md's table is ``LAYERS``);
* megatron-core's global ``parallel_state`` is read only by ``gpt_dist/parallel.py``: every
  other module of the project gets its groups from the ``ParallelContext`` (or the
  ``TPGroup`` it hands the model), so no code can use a group the context does not own or
  outlive the context that destroys them. megatron-core's own layers read its globals
  internally, which ``parallel.py`` initialises.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARALLEL_STATE = re.compile(r"\bparallel_state\b|\bmegatron\.core\.mpu\b|from megatron\.core import .*\bmpu\b")


def _hits(pattern: re.Pattern[str], allowed: set[str], tops: tuple[str, ...]) -> tuple[int, list[str]]:
    scanned, hits = 0, []
    for top in tops:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            scanned += 1
            if rel in allowed:
                continue
            for no, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    hits.append(f"{rel}:{no}: {line.strip()}")
    return scanned, hits


def test_only_parallel_py_reads_megatron_parallel_state():
    scanned, hits = _hits(PARALLEL_STATE, {"gpt_dist/parallel.py"}, ("gpt_dist", "launch", "data_tools"))
    assert scanned > 50, f"only {scanned} files scanned: wrong root {ROOT}?"
    assert hits == [], "\n".join(hits)


def test_the_check_finds_a_read(tmp_path):
    """Negative control: the pattern catches the forms a read takes."""
    for line in ("from megatron.core import parallel_state as ps", "import megatron.core.parallel_state",
                 "from megatron.core.parallel_state import get_tensor_model_parallel_group",
                 "from megatron.core import mpu"):
        assert PARALLEL_STATE.search(line), line
    assert not PARALLEL_STATE.search("from megatron.core import tensor_parallel")


# --------------------------------------------------------------------------- the layers

#: docs/architecture.md's table: module prefix -> (layer, application or None); the longest
#: matching prefix wins.
LAYERS: dict[str, tuple[int, str | None]] = {
    "gpt_dist": (0, None),
    "gpt_dist.config": (0, None), "gpt_dist.utils": (0, None), "gpt_dist.device": (0, None),
    "gpt_dist.rng": (0, None), "gpt_dist.tokenizer": (0, None),
    "gpt_dist.data.indexed": (0, None), "gpt_dist.data.shardset": (0, None), "gpt_dist.data.readers": (0, None),
    "gpt_dist.parallel": (1, None), "gpt_dist.deepspeed_compat": (1, None), "gpt_dist.kernels": (1, None),
    "gpt_dist.model": (2, None), "gpt_dist.pipeline": (2, None),
    "gpt_dist.checkpoint_format": (3, None), "gpt_dist.export": (3, None),
    "gpt_dist.inference": (4, None),
    "gpt_dist.training": (5, None),
    "gpt_dist.training.pretrain": (6, "pretraining"),
    "gpt_dist.data": (6, "data tools"),
    "gpt_dist.finetune": (6, "fine-tuning"),
    "gpt_dist.eval": (6, "evaluation"),
    "gpt_dist.dryrun": (6, "dry run"),
}
#: The one import between applications: pretraining's in-training zero-shot evaluation.
BETWEEN_APPLICATIONS = {("gpt_dist.training.pretrain", "gpt_dist.eval.training")}


def _layer(module: str) -> tuple[int, str | None]:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, module) of every project import in ``path``, function-local ones included;
    ``from gpt_dist.x import y`` counts as ``gpt_dist.x.y`` when that is a module."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("gpt_dist"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                is_module = (root / (sub.replace(".", "/") + ".py")).is_file() or (root / sub.replace(".", "/")).is_dir()
                out.append((node.lineno, sub if is_module else str(node.module)))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("gpt_dist")]
    return out


def layering_violations(root: Path) -> list[str]:
    bad = []
    for path in sorted((root / "gpt_dist").rglob("*.py")):
        src = _module_name(path, root)
        (ls, app_s) = _layer(src)
        for line, dst in _imports(path, root):
            (ld, app_d) = _layer(dst)
            if ld > ls:
                bad.append(f"{path.relative_to(root)}:{line}: {src} (layer {ls}) imports {dst} (layer {ld})")
            elif app_s and app_d and app_s != app_d and not any(
                    src == a and (dst == b or dst.startswith(b + ".")) for a, b in BETWEEN_APPLICATIONS):
                bad.append(f"{path.relative_to(root)}:{line}: application {app_s} imports application {app_d} ({dst})")
    return bad


def test_imports_follow_the_layers():
    assert len(list((ROOT / "gpt_dist").rglob("*.py"))) > 50
    bad = layering_violations(ROOT)
    assert bad == [], "\n".join(bad)


def test_the_layer_check_catches_what_it_must(tmp_path):
    """Negative controls on a small tree: the model importing the training core (inside a
    function), fine-tuning importing evaluation, and evaluation importing pretraining are
    reported; pretraining importing ``eval.training`` (the documented exception) is not."""
    files = {
        "gpt_dist/model/m.py": "def f():\n    from gpt_dist.training import engine\n",
        "gpt_dist/training/engine.py": "",
        "gpt_dist/finetune/f.py": "import gpt_dist.eval.tasks\n",
        "gpt_dist/eval/tasks.py": "from gpt_dist.training.pretrain import LMObjective\n",
        "gpt_dist/eval/training.py": "",
        "gpt_dist/training/pretrain.py": "from gpt_dist.eval.training import ZeroShot\nfrom gpt_dist.training import engine\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    bad = layering_violations(tmp_path)
    assert len(bad) == 3, bad
    assert any("gpt_dist/model/m.py:2" in b and "gpt_dist.training.engine (layer 5)" in b for b in bad), bad
    assert any("application fine-tuning imports application evaluation" in b for b in bad), bad
    assert any("application evaluation imports application pretraining" in b for b in bad), bad

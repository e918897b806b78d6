"""T14: no unsafe deserialisation in the code base; untrusted checkpoints are refused
before anything unpickles them; tags and paths cannot escape the checkpoint directory."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import torch

from gpt_dist.training import checkpoint as ckpt
from tests.reliability import fake
from tests.reliability.test_t04_corrupt import _resume

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("gpt_dist", "launch", "data_tools")


# --------------------------------------------------------------------------- (a) static


def _kw(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_calls(source: str, filename: str) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        attr = node.func.attr
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
        where = f"{filename}:{node.lineno}"
        if owner == "torch" and attr == "load" and not _const(_kw(node, "weights_only"), True):
            out.append(f"{where}: torch.load without weights_only=True")
        elif owner in ("pickle", "cPickle", "dill", "_pickle") and attr in ("load", "loads", "Unpickler"):
            out.append(f"{where}: {owner}.{attr}")
        elif owner in ("np", "numpy") and attr == "load" and _const(_kw(node, "allow_pickle"), True):
            out.append(f"{where}: np.load(allow_pickle=True)")
        elif owner == "yaml" and attr in ("unsafe_load", "full_load") or (
                owner == "yaml" and attr == "load" and not (
                    isinstance(_kw(node, "Loader"), ast.Attribute) and _kw(node, "Loader").attr in ("SafeLoader", "CSafeLoader"))):
            out.append(f"{where}: yaml.{attr} without SafeLoader")
        elif owner == "marshal" and attr in ("load", "loads"):
            out.append(f"{where}: marshal.{attr}")
    return out


def test_scanner_finds_the_unsafe_forms():
    src = ("import torch, pickle, numpy as np, yaml\n"
           "torch.load(p)\ntorch.load(p, weights_only=False)\npickle.loads(b)\n"
           "np.load(p, allow_pickle=True)\nyaml.load(s)\n"
           "torch.load(p, map_location='cpu', weights_only=True)\nnp.load(p)\n"
           "yaml.load(s, Loader=yaml.SafeLoader)\n")
    found = unsafe_calls(src, "x.py")
    assert [f.split(":")[1] for f in found] == ["2", "3", "4", "5", "6"], found


def test_no_unsafe_deserialisation_in_code_base():
    bad = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            bad += unsafe_calls(path.read_text(), str(path.relative_to(ROOT)))
    assert bad == []


# --------------------------------------------------------------------------- (a) runtime


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


FILES = ["mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_rank_00000.pt"]


def _rehash(tag_dir: Path, sign: bool = False) -> None:
    """What an attacker who can write the directory does: fix sizes and hashes."""
    from gpt_dist.utils import sha256_file

    mpath = tag_dir / "manifest.json"
    m = json.loads(mpath.read_text())
    m.pop("signature", None)
    for name in list(m["files"]):
        if (tag_dir / name).exists():
            m["files"][name] = {"size": (tag_dir / name).stat().st_size, "sha256": sha256_file(tag_dir / name)}
    if sign:
        m = ckpt.sign_manifest(m, ckpt.manifest_key(tag_dir.parent))
    mpath.write_text(json.dumps(m))


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("rehash", [False, True], ids=["hash_mismatch", "forged_manifest"])
def test_planted_payload_never_executes(tmp_path, name, rehash):
    fake.make_run(tmp_path, steps=(10,))
    marker = tmp_path / "PWNED"
    tag_dir = tmp_path / "checkpoints" / "global_step10"
    torch.save({"module": Payload(marker)}, tag_dir / name)
    if rehash:
        _rehash(tag_dir)
    err = ckpt.CheckpointUntrustedError if rehash else ckpt.CheckpointCorruptError
    with pytest.raises(err, match=rf"{name}: (sha256 mismatch|size)" if not rehash else "not signed"):
        _resume(tmp_path)
    assert not marker.exists()


def test_rng_file_loaded_weights_only_even_when_trusted(tmp_path, monkeypatch):
    """With GPT_DIST_TRUST_CHECKPOINT=1 the signature is not checked; the RNG file is still
    loaded with weights_only=True, so a payload in it is refused, not run."""
    fake.make_run(tmp_path, steps=(10,))
    marker = tmp_path / "PWNED"
    tag_dir = tmp_path / "checkpoints" / "global_step10"
    torch.save({"torch": Payload(marker)}, tag_dir / "rng_rank_00000.pt")
    _rehash(tag_dir)
    monkeypatch.setenv(ckpt.TRUST_ENV, "1")
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        _resume(tmp_path)
    assert not marker.exists()


def test_trust_override_accepts_foreign_but_intact_checkpoint(tmp_path, monkeypatch):
    fake.make_run(tmp_path, steps=(10,))
    (tmp_path / "checkpoints" / ".manifest_key").unlink()  # a checkpoint from another run
    with pytest.raises(ckpt.CheckpointUntrustedError, match="no manifest key"):
        _resume(tmp_path)
    monkeypatch.setenv(ckpt.TRUST_ENV, "1")
    eng, _state, _ = _resume(tmp_path)
    assert eng.loads == ["global_step10"]


def test_foreign_key_refused(tmp_path):
    fake.make_run(tmp_path, steps=(10,))
    key = tmp_path / "checkpoints" / ".manifest_key"
    os.chmod(key, 0o600)
    key.write_text("ab" * 32)  # another run's key
    with pytest.raises(ckpt.CheckpointUntrustedError, match="signature does not match"):
        _resume(tmp_path)


def test_crafted_dcp_metadata_with_unsigned_manifest_refused(tmp_path):
    """(c): a crafted DCP-style .metadata and a manifest that lists it with correct hashes."""
    from gpt_dist.utils import sha256_file

    fake.make_run(tmp_path, steps=(10,))
    marker = tmp_path / "PWNED"
    tag_dir = tmp_path / "checkpoints" / "global_step10"
    import pickle

    (tag_dir / "__0_0.distcp").write_bytes(pickle.dumps(Payload(marker)))
    m = json.loads((tag_dir / "manifest.json").read_text())
    m.pop("signature")
    m["files"]["__0_0.distcp"] = {"size": (tag_dir / "__0_0.distcp").stat().st_size,
                                  "sha256": sha256_file(tag_dir / "__0_0.distcp")}
    (tag_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ckpt.CheckpointUntrustedError):
        ckpt.find_resumable(tmp_path)
    assert not marker.exists()


# --------------------------------------------------------------------------- (b) paths


@pytest.mark.parametrize("latest", ["../../outside/global_step8", "/tmp/global_step8",
                                    "global_step8/../../x", "global_step8\n../x"])
def test_latest_path_traversal_rejected(tmp_path, latest):
    fake.make_run(tmp_path, steps=(10,))
    (tmp_path / "checkpoints" / "latest").write_text(latest)
    with pytest.raises(ckpt.CheckpointCorruptError):
        _resume(tmp_path)


def test_symlinked_step_dir_rejected(tmp_path):
    outside = tmp_path / "outside"
    fake.make_run(outside, steps=(8,))
    run = tmp_path / "run"
    fake.make_run(run, steps=(4,))
    root = run / "checkpoints"
    os.symlink(outside / "checkpoints" / "global_step8", root / "global_step8")
    (root / "latest").write_text("global_step8")
    with pytest.raises(ckpt.CheckpointCorruptError, match="resolves outside"):
        _resume(run)
    eng, _state, _log = _resume(run, on_corrupt="fallback")
    assert eng.loads == ["global_step4"]
    # retention never follows the link: the outside checkpoint is untouched
    ckpt._retention(root, keep_last=1, newest="global_step4")
    assert (outside / "checkpoints" / "global_step8" / "manifest.json").exists()


def test_dotdot_file_name_in_signed_manifest_rejected(tmp_path):
    fake.make_run(tmp_path, steps=(10,))
    tag_dir = tmp_path / "checkpoints" / "global_step10"
    m = json.loads((tag_dir / "manifest.json").read_text())
    m["files"]["../../evil.pt"] = {"size": 1, "sha256": "0" * 64}
    m = ckpt.sign_manifest(m, ckpt.manifest_key(tag_dir.parent))
    (tag_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ckpt.CheckpointCorruptError, match="escapes the checkpoint"):
        _resume(tmp_path)

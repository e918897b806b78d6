"""The training session destroys the process groups it created on every exit path: a normal
end, an error inside it, and the non-finite stop (which then exits with EXIT_NONFINITE)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import helpers

ROOT = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).resolve().parent / "_session_probe.py"


@pytest.mark.slow  # three subprocesses that import DeepSpeed
@pytest.mark.parametrize("mode", ["ok", "error", "nonfinite"])
def test_session_destroys_its_groups_on_every_exit_path(tmp_path, mode):
    from gpt_dist.training.loop import EXIT_NONFINITE

    res = helpers.run(helpers.python_cmd(PROBE, ROOT / "configs" / "tiny_cpu.json", tmp_path / "run", mode),
                      timeout=300, env=helpers.child_env())
    out = res.output
    assert "inside: GROUPS ALIVE 1" in out, res.describe()
    assert "at exit: GROUPS DESTROYED" in out, res.describe()
    if mode == "nonfinite":
        assert res.rc == EXIT_NONFINITE, res.describe()
        assert "after:" not in out  # the process ends at the session's exit
        assert "error: 3 consecutive non-finite steps" in out  # logged before the exit
    else:
        assert res.rc == 0, res.describe()
        assert "after: GROUPS DESTROYED" in out, res.describe()
        assert ("raised: boom" in out) == (mode == "error")
    assert (tmp_path / "run" / "config.json").is_file()  # the session wrote the resolved config

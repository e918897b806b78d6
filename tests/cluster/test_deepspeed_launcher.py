"""The headline command, ``deepspeed [--hostfile H] launch/pretrain.py --config ...``: the
DeepSpeed launcher (its runner, then ``deepspeed.launcher.launch`` spawning one process per
slot) on this machine, with and without a hostfile, reproduces the torchrun reference bit
for bit.

With a hostfile the runner first checks each host with ``ssh HOST hostname``; a host with no
ssh server gets a stand-in ``ssh`` (first on PATH) that runs the command here. A hostfile
that names only this host then makes the runner launch locally, the code path every node of
a multi-node DeepSpeed job runs after pdsh has reached it.
"""

from __future__ import annotations

import os

import pytest
from cluster_helpers import BIN, ROOT, clean_env, free_port, losses, pretrain_args, run_logged, tail, write_config

pytestmark = pytest.mark.slow

# ssh [-o OPT | -p PORT | -FLAG]... HOST COMMAND...: run COMMAND on this machine
SSH_SHIM = """#!/bin/bash
while [[ "$1" == -* ]]; do
    case "$1" in -o|-p|-i|-l) shift ;; esac
    shift
done
shift
exec bash -c "$*"
"""


@pytest.mark.parametrize("hostfile", [False, True], ids=["num_gpus", "hostfile"])
def test_deepspeed_launcher_matches_torchrun(tmp_path, reference, hostfile: bool):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.json", reference["toy"], run_dir)
    env = clean_env(DS_ACCELERATOR="cpu")
    if hostfile:
        hosts = tmp_path / "hostfile"
        hosts.write_text("# one node, two slots\nlocalhost slots=2\n")
        where = ["--hostfile", str(hosts)]
        shim = tmp_path / "bin" / "ssh"
        shim.parent.mkdir()
        shim.write_text(SSH_SHIM)
        shim.chmod(0o755)
        env["PATH"] = f"{shim.parent}{os.pathsep}{env['PATH']}"
    else:
        where = ["--num_gpus", "2"]
    # --no_local_rank: the rank comes from LOCAL_RANK/RANK in the environment, as with torchrun
    cmd = [str(BIN / "deepspeed"), *where, "--master_port", str(free_port()), "--no_local_rank",
           *pretrain_args(cfg)]
    log = tmp_path / "deepspeed.log"
    proc = run_logged(cmd, log, timeout=240, env=env, cwd=ROOT)
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, tail(log)
    assert "[launcher] torchrun/deepspeed rank 0/2" in text and "[launcher] torchrun/deepspeed rank 1/2" in text, tail(log)
    if hostfile:  # the runner read the hostfile and reached the host through "ssh"
        assert "for node localhost" in text and "WORLD INFO DICT: {'localhost': [0, 1]}" in text, tail(log)
    assert losses(run_dir) == reference["losses"], tail(log)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "global_step12"

"""Two "hosts" on one machine: network namespaces joined by a veth pair, one rank in each.

    gdA (10.77.0.1/24, veth gdA0) <====> gdB (10.77.0.2/24, veth gdB0)

torchrun --nnodes 2 --node-rank N in each namespace rendezvous over TCP on 10.77.0.1 (static
rendezvous, MASTER_ADDR/PORT); gloo is pinned to the veth interface. Traffic stays inside the
two namespaces. The 2-node run must reproduce the single-host 2-rank reference bit for bit.
Needs root (ip netns); the namespaces and links are deleted when the test ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time

import pytest
from cluster_helpers import BIN, STEPS, clean_env, losses, pretrain_args, tail, write_config

from tests import helpers

pytestmark = pytest.mark.slow

NS = ("gdA", "gdB")
ADDR = ("10.77.0.1", "10.77.0.2")
IFACE = ("gdA0", "gdB0")
PORT = 29477


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def _teardown() -> None:
    for ns in NS:
        _ip("netns", "del", ns, check=False)  # deleting a namespace deletes its veth end
    _ip("link", "del", IFACE[0], check=False)


@pytest.fixture
def netns():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if not shutil.which("ip"):
        pytest.skip("needs iproute2 (ip)")
    _teardown()  # leftovers of an interrupted run
    try:
        for ns in NS:
            _ip("netns", "add", ns)
        _ip("link", "add", IFACE[0], "type", "veth", "peer", "name", IFACE[1])
        for ns, iface, addr in zip(NS, IFACE, ADDR, strict=True):
            _ip("link", "set", iface, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", iface)
            _ip("-n", ns, "link", "set", iface, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        ping = shutil.which("ping")
        if ping:
            subprocess.run(["ip", "netns", "exec", NS[1], ping, "-c", "1", "-W", "5", ADDR[0]],
                           check=True, capture_output=True, timeout=30)
        yield
    finally:
        _teardown()


def test_two_namespaces_one_rank_each_match_single_host(tmp_path, reference, netns):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.json", reference["toy"], run_dir)
    logs = [tmp_path / f"node{node}.log" for node in range(2)]
    with contextlib.ExitStack() as stack:  # leaving it kills what still runs
        jobs = []
        for node, (ns, iface) in enumerate(zip(NS, IFACE, strict=True)):
            env = clean_env(GLOO_SOCKET_IFNAME=iface, TP_SOCKET_IFNAME=iface,
                            NCCL_SOCKET_IFNAME=iface)
            cmd = ["ip", "netns", "exec", ns, str(BIN / "torchrun"), "--nnodes=2",
                   f"--node-rank={node}", "--nproc-per-node=1", f"--master-addr={ADDR[0]}",
                   f"--master-port={PORT}", "--max-restarts=0", "--monitor-interval=0.5",
                   *pretrain_args(cfg)]
            jobs.append(stack.enter_context(helpers.Job(cmd, env=env, log=logs[node])))
        deadline = time.time() + 300
        while any(j.poll() is None for j in jobs) and time.time() < deadline:
            if any(j.poll() not in (None, 0) for j in jobs):
                break
            time.sleep(0.5)
        rcs = [j.poll() for j in jobs]
        for j in jobs:  # the finished ones: no process of their session may survive
            if j.poll() is not None:
                j.wait(timeout=10)
    report = "\n".join(f"--- {log.name}\n{tail(log, 40)}" for log in logs)
    assert rcs == [0, 0], f"exit codes {rcs}\n{report}"
    text = [log.read_text(errors="replace") for log in logs]
    assert f"[launcher] torchrun/deepspeed rank 0/2 local 0 master {ADDR[0]}:" in text[0], report
    assert f"[launcher] torchrun/deepspeed rank 1/2 local 0 master {ADDR[0]}:" in text[1], report
    assert losses(run_dir) == reference["losses"], report
    tag = run_dir / "checkpoints" / f"global_step{STEPS}"
    assert sorted(p.name for p in tag.glob("rng_rank_*.pt")) == ["rng_rank_00000.pt", "rng_rank_00001.pt"]

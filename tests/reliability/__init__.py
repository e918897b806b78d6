"""Reliability suite (GitHub issue #5; test plan: RELIABILITY.md section 5).

    .venv/bin/python -m pytest tests/reliability -m "not slow"   # unit group, ~1 min
    .venv/bin/python -m pytest tests/reliability                 # + 2-rank torchrun runs

T1 golden/bitwise determinism, T2 kill -9 + restart (ZeRO-1 vs reference, ZeRO-3 vs first
attempt, negative controls rng/optim/data), T3 crash during a save (mid-shard, before commit,
in retention), T4 corruption detection + fallback, T5 disk full (fail / continue),
T6 dead or hung rank, T7 non-finite skip + exit 17 + loss-scaler unit, T9 data position
(unit), T12 incompatible-architecture resume, T14 unsafe deserialisation, signed manifests
and path traversal. Faults are chosen per launch by GPT_DIST_TEST_* environment
variables, which only the test runner reads (tests/faults.py builds ``TrainHooks`` from
them and passes them to ``pretrain``; the library reads no test variable). Regenerate the T1 golden file
with GPT_DIST_REGEN_GOLDEN=1 (or ``python -m tests.reliability.golden``).
"""

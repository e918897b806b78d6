#!/usr/bin/env python
"""Clean, filter, deduplicate and tokenize a corpus into Megatron indexed-dataset shards.

    python data_tools/preprocess.py --input 'corpus/*.jsonl' --tokenizer DIR \\
        --output-prefix data/webtext --workers N

Inputs: JSONL (key --json-key, default "text"), .jsonl.gz, plain-text files (one
document per file); globs and directories. Outputs: PREFIX_00000.bin/.idx/.meta.json ...,
PREFIX.manifest.json and PREFIX.rejected.jsonl (bad lines with file, line and reason).
Re-running the same command resumes after the last complete shard. See docs/data.md.

Staged (many nodes, slurm/preprocess.sh submits the chain as Slurm job arrays):

    python data_tools/preprocess.py --stage plan --tasks N --work-dir SHARED/work \
        --input ... --tokenizer DIR --output-prefix SHARED/data/webtext
    python data_tools/preprocess.py --stage keys --work-dir SHARED/work [--task-id K]
    ... bands (per task), components (one), tokenize (per task), finalize (one)

``--task-id`` defaults to $SLURM_ARRAY_TASK_ID; ``--stage all`` runs every stage and task
in this process; ``--stage status`` lists what is complete and each failed task's log. A
task with a completion marker is skipped when rerun.
"""

from __future__ import annotations

import argparse
import os
import sys

from gpt_dist.data.clean import CleanConfig
from gpt_dist.data.dedup import DedupConfig
from gpt_dist.data.preprocess import (
    PreprocessConfig,
    PreprocessError,
    preprocess,
    summary_table,
)
from gpt_dist.data.readers import InputError
from gpt_dist.data.staged import PER_TASK, STAGES, StageError
from gpt_dist.data.staged_merge import run_all, run_stage, status

PROG = "preprocess"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", help="files, globs or directories (required but for staged tasks)")
    p.add_argument("--tokenizer", help="tokenizer directory or file (gpt_dist.tokenizer)")
    p.add_argument("--output-prefix", help="e.g. data/webtext -> data/webtext_00000.bin ...")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: all cores; 0: in-process)")
    p.add_argument("--partitions", type=int, default=1,
                   help="Megatron-compatible; only scales the batches in flight (outputs never depend on it)")
    p.add_argument("--shard-tokens", type=int, default=50_000_000, help="start a new shard after this many tokens")
    p.add_argument("--json-key", default="text", help="JSONL key holding the document text")
    p.add_argument("--max-doc-bytes", type=int, default=1_000_000, help="reject lines/files larger than this")
    p.add_argument("--strict", action="store_true", help="stop at the first bad line (file:line: reason), write nothing")
    p.add_argument("--overwrite", action="store_true", help="delete an existing output at this prefix first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--batch-docs", type=int, default=1024,
                   help="documents per worker task (smaller: finer load balancing; outputs never depend on it)")
    c = p.add_argument_group("cleaning and quality filters")
    c.add_argument("--unicode", default="NFC", choices=["NFC", "NFKC", "none"], help="Unicode normalization")
    c.add_argument("--min-chars", type=int, default=CleanConfig.min_chars, help="drop shorter documents")
    c.add_argument("--max-chars", type=int, default=CleanConfig.max_chars, help="drop longer documents (0: off)")
    c.add_argument("--min-alpha", type=float, default=CleanConfig.min_alpha,
                   help="drop documents whose share of letters among non-space characters is lower")
    c.add_argument("--max-repeated-lines", type=float, default=CleanConfig.max_repeated_lines,
                   help="drop documents whose share of repeated non-blank lines is higher (1: off)")
    d = p.add_argument_group("deduplication")
    d.add_argument("--no-exact-dedup", action="store_true", help="keep exact duplicates")
    d.add_argument("--no-near-dedup", action="store_true", help="keep near duplicates")
    d.add_argument("--dedup-threshold", type=float, default=DedupConfig.threshold, help="MinHash-LSH Jaccard threshold")
    d.add_argument("--num-perm", type=int, default=DedupConfig.num_perm, help="MinHash permutations")
    st = p.add_argument_group("staged job (slurm/preprocess.sh; see docs/data.md)")
    st.add_argument("--stage", choices=[*STAGES, "all", "status"],
                    help="run one stage's task (all: every stage here; status: which tasks are complete)")
    st.add_argument("--task-id", type=int, help="the task of a per-task stage (default: $SLURM_ARRAY_TASK_ID)")
    st.add_argument("--tasks", type=int, default=1, help="number of tasks (plan and all)")
    st.add_argument("--work-dir", help="the job's work directory on a file system every node shares")
    return p


def _task_id(args: argparse.Namespace) -> int:
    if args.task_id is not None:
        return int(args.task_id)
    env = os.environ.get("SLURM_ARRAY_TASK_ID")
    if env is None or not env.isdigit():
        raise StageError(f"--stage {args.stage}: give --task-id (SLURM_ARRAY_TASK_ID is not set)")
    return int(env)


def run_staged(args: argparse.Namespace, cfg: PreprocessConfig | None) -> int:
    """One task of one stage (or all of them); prints one line, or the manifest's summary."""
    if not args.work_dir:
        raise StageError(f"--stage {args.stage}: --work-dir is required")
    if args.stage == "status":
        complete, lines = status(args.work_dir)
        print("\n".join(lines))
        return 0 if complete else 1
    if args.stage == "all":
        assert cfg is not None
        manifest = run_all(cfg, args.work_dir, args.tasks)
    elif args.stage in PER_TASK:
        task = _task_id(args)
        out = run_stage(args.stage, args.work_dir, task)
        print(f"{PROG}: {args.stage} task {task}: done ({args.work_dir})")
        return 0 if out else 1
    else:
        manifest = run_stage(args.stage, args.work_dir, 0, cfg, args.tasks)
        if args.stage != "finalize":
            print(f"{PROG}: {args.stage}: done ({args.work_dir})")
            return 0
    if manifest.get("already_complete"):
        print(f"{PROG}: {cfg.output_prefix if cfg else args.work_dir}: already complete; nothing to do")
        return 0
    print(f"{PROG}: wrote {len(manifest['shards'])} shard(s) at {manifest['output_prefix']}_* "
          f"({manifest['staged']['tasks']} tasks)")
    print(summary_table(manifest))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    needs_cfg = args.stage in (None, "plan", "all")
    missing = [f"--{k.replace('_', '-')}" for k in ("input", "tokenizer", "output_prefix") if not getattr(args, k)]
    if needs_cfg and missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    if not needs_cfg:
        try:
            return run_staged(args, None)
        except (PreprocessError, InputError) as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"{PROG}: error: {exc.filename or args.work_dir}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    cfg = PreprocessConfig(
        inputs=args.input, tokenizer=args.tokenizer, output_prefix=args.output_prefix, workers=args.workers,
        partitions=args.partitions, shard_tokens=args.shard_tokens, max_doc_bytes=args.max_doc_bytes,
        strict=args.strict, overwrite=args.overwrite, progress=False if args.no_progress else None,
        batch_docs=max(1, args.batch_docs),
        clean=CleanConfig(text_key=args.json_key, unicode_form=args.unicode, min_chars=args.min_chars,
                          max_chars=args.max_chars, min_alpha=args.min_alpha,
                          max_repeated_lines=args.max_repeated_lines),
        dedup=DedupConfig(exact=not args.no_exact_dedup, near=not args.no_near_dedup,
                          threshold=args.dedup_threshold, num_perm=args.num_perm))
    try:
        if args.stage is not None:
            return run_staged(args, cfg)
        manifest = preprocess(cfg)
    except (PreprocessError, InputError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # disk full, permissions, a file vanishing mid-run
        print(f"{PROG}: error: {exc.filename or args.output_prefix}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; completed shards are kept, re-run to resume", file=sys.stderr)
        return 130
    if manifest.get("already_complete"):
        print(f"{PROG}: {args.output_prefix}: already complete ({len(manifest['shards'])} shards); nothing to do")
        return 0
    print(f"{PROG}: wrote {len(manifest['shards'])} shard(s) at {args.output_prefix}_*")
    print(summary_table(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())

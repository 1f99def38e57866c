"""``python -m bench.eval run|report|sizes|pack-model``: the quality benchmark's command line."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from xpeft.adapters.errors import XPeftError


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the run the way Ctrl-C does: every written line is whole


def _names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def cmd_run(args: argparse.Namespace) -> int:
    from bench.eval.config import load_config
    from bench.eval.runner import Runner

    config = load_config(args.config)
    signal.signal(signal.SIGTERM, _interrupt)
    runner = Runner(
        config,
        args.out,
        data_root=args.data_root,
        model=args.model,
        device=args.device,
        jobs=args.jobs,
        threads=args.threads,
        deadline_seconds=args.deadline_seconds,
        only_variants=_names(args.only_variants),
        only_tasks=_names(args.only_tasks),
        only_methods=_names(args.only_methods),
        work_dir=args.work_dir,
        progress=not args.no_progress,
        argv=["python", "-m", "bench.eval", *args.argv],
    )
    reason = runner.run()
    return 130 if reason == "interrupted" else 0


def cmd_report(args: argparse.Namespace) -> int:
    from bench.eval.report import write_report
    from bench.eval.targets import Shipped

    command = shlex.join(["python", "-m", "bench.eval", *args.argv])
    if args.sizes is None:
        args.sizes = str(Path(args.results).parent / "sizes.json")
    shipped = Shipped(args.shipped_method, args.shipped_variant or "default")
    path = write_report(
        args.results, args.out, img_dir=args.img_dir, command=command, shipped=shipped, sizes_path=args.sizes
    )
    print(f"wrote {path}")
    if args.method_doc or args.readme:
        from bench.eval import method_doc, summary
        from bench.eval.analysis import Results
        from bench.eval.results import read_results

        res = Results(read_results(args.results))
        if args.method_doc:
            text = method_doc.block(res, args.results, command)
            print(f"wrote {method_doc.fill(args.method_doc, text)}")
        if args.readme:
            from bench.eval import sizes

            text = summary.block(
                res,
                args.results,
                command,
                doc=args.out,
                shipped=shipped,
                shipped_sizes=sizes.read(args.sizes),
                sizes_path=args.sizes,
            )
            print(f"wrote {method_doc.fill(args.readme, text, 'summary')}")
    return 0


def cmd_sizes(args: argparse.Namespace) -> int:
    from bench.eval.sizes import run

    labels = [int(n) for n in _names(args.labels) or []]
    if not labels or min(labels) < 2:
        raise XPeftError("bad_argument", "--labels takes label counts of 2 or more, e.g. 2,3,6,15")
    print(f"wrote {run(args.out, labels, args.model)}")
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from bench.eval.carry import pack_model

    size = pack_model(args.out, args.model)
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.eval", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run (or resume) a config's grid; one JSON line per finished run")
    p.add_argument("--config", required=True, help="e.g. bench/eval/cpu.json")
    p.add_argument("--out", required=True, help="results JSONL; runs already in it are skipped")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (spawned, one torch thread each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--deadline-seconds", type=float, default=None, help="start no run that would end later")
    p.add_argument("--only-variants", default=None, help="comma-separated variant names (default: all)")
    p.add_argument("--only-tasks", default=None, help="comma-separated task names (default: all)")
    p.add_argument(
        "--only-methods",
        default=None,
        help="comma-separated method names, e.g. head_only,single_adapter,units (default: all)",
    )
    p.add_argument("--data-root", default="../shared/data", help="folder holding sst2/, clinc150/, ...")
    p.add_argument("--model", default=None, help="encoder alias or folder (default: the config's)")
    p.add_argument("--device", default=None, help="cpu, cuda, auto (default: the config's)")
    p.add_argument("--work-dir", default="bench/eval/.work", help="cache of built banks (git-ignored)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("report", help="render the evaluation doc and its plots from a results file")
    p.add_argument("--results", required=True)
    p.add_argument("--out", default="docs/EVALUATION.md")
    p.add_argument("--img-dir", default=None, help="plots folder (default: img/eval beside --out)")
    p.add_argument("--method-doc", default=None, help="also fill the diagnostics block of this page")
    p.add_argument("--readme", default=None, help="also fill the quality summary block of this page")
    p.add_argument("--shipped-method", default="hard", help="the method the library trains by default")
    p.add_argument(
        "--shipped-variant",
        default=None,
        help="the variant equal to the library's defaults (default: default)",
    )
    p.add_argument(
        "--sizes",
        default=None,
        help="sizes of the shipped default (python -m bench.eval sizes) for the size sections "
        "(default: sizes.json beside --results)",
    )
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("sizes", help="bytes of the profiles `xpeft train` writes by default, per label count")
    p.add_argument("--out", default="bench/eval/results/sizes.json")
    p.add_argument("--labels", default="2,3,6,15", help="comma-separated label counts")
    p.add_argument("--model", default="minilm", help="encoder alias or folder")
    p.set_defaults(func=cmd_sizes)
    p = sub.add_parser("pack-model", help="copy the encoder with fp16-stored weights (for gpu.sh)")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="minilm")
    p.set_defaults(func=cmd_pack)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return int(args.func(args))
    except XPeftError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``xpeft train --url URL --id ID --data FILE``: train on a server instead of here.

The examples file is uploaded as it is (the server reads it with the same column options); the
command follows the job with a progress bar (on a terminal only) until the profile is served,
then prints the job's final record. ``--no-wait`` prints the queued job and returns at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from xpeft.adapters.errors import XPeftError
from xpeft.cli.output import print_json
from xpeft.training.train_config import TrainConfig


def add_remote_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``xpeft train`` that only a server run uses."""
    g = p.add_argument_group("training on a server (--url)")
    g.add_argument("--url", default=None, help="train on this server instead of here (needs --id)")
    g.add_argument("--id", dest="profile_id", default=None, help="the profile id the server stores")
    g.add_argument("--token", default=None, help="admin or tenant token (default: $XPEFT_ADMIN_TOKEN)")
    g.add_argument(
        "--eval-fraction",
        type=float,
        default=None,
        help="share of the examples held out (server default 0.1)",
    )
    g.add_argument(
        "--keep-if-better",
        action="store_true",
        help="keep the current version unless the new one scores at least as well on the held-out examples",
    )
    g.add_argument("--no-wait", action="store_true", help="print the queued job and return")
    g.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")


def _options(args: argparse.Namespace, flags: tuple[str, ...]) -> dict[str, Any]:
    """Only the settings the user changed: the server's library supplies its own defaults."""
    defaults = TrainConfig()
    options = {n: getattr(args, n) for n in flags if getattr(args, n) != getattr(defaults, n)}
    if args.eval_fraction is not None:
        options["eval_fraction"] = args.eval_fraction
    if args.keep_if_better:
        options["keep_if_better"] = True
    return options


def train_remote(args: argparse.Namespace, flags: tuple[str, ...]) -> None:
    from xpeft.client import Client

    if not args.profile_id:
        raise XPeftError("bad_argument", "train --url needs --id (the profile id to store)")
    if args.eval_data:
        raise XPeftError("bad_argument", "--eval-data is offline only; the server holds out --eval-fraction")
    path = Path(args.data)
    columns = {"text_col": args.text_col, "label_col": args.label_col}
    if args.text_pair_col:
        columns["text_pair_col"] = args.text_pair_col
    with Client(args.url, token=args.token) as client:
        job = client.train(args.profile_id, file=path, columns=columns, **_options(args, flags))
        if args.no_wait:
            print_json(job.record)
            return
        bar = _Bar(enabled=not args.quiet and sys.stderr.isatty())
        try:
            record = job.wait(timeout=args.timeout, on_progress=bar.update)
        finally:
            bar.close()
    print_json(record)


class _Bar:
    """A tqdm bar fed from the job's progress records."""

    def __init__(self, enabled: bool) -> None:
        self.bar: Any = None
        self.enabled = enabled

    def update(self, record: dict) -> None:
        progress = record.get("progress") or {}
        total, step = progress.get("total"), progress.get("step", 0)
        if not self.enabled or not total:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="train (server)", unit="step")
        self.bar.update(step - self.bar.n)
        if "loss" in progress:
            self.bar.set_postfix(loss=f"{progress['loss']:.3f}", acc=f"{progress['train_accuracy']:.3f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

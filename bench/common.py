"""What every benchmark script shares: where it works, its final JSON line, and sides timed in interleaved rounds."""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("bench")
Result = TypeVar("Result")


def measure_and_print(measure: Callable[[argparse.Namespace, Path], dict], args: argparse.Namespace) -> None:
    """Run measure(args, work_dir) in args.work_dir (kept) or a temporary directory (removed after), its progress
    logged to stderr, then print its figures as one JSON object: the script's last stdout line."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    if args.work_dir:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        figures = measure(args, args.work_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="rag_bench_") as work:
            figures = measure(args, Path(work))
    print(json.dumps(figures))


def parse_with_quick(parser: argparse.ArgumentParser, quick: dict) -> argparse.Namespace:
    """parser's arguments, with a --quick flag that makes `quick` (option: value) the defaults: a small run that
    checks the script works, its figures meaningless. Options given on the command line still win."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a quick check that it runs: "
        + ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in quick.items()),
    )
    args = parser.parse_args()
    if args.quick:
        parser.set_defaults(**quick)
        args = parser.parse_args()
    return args


def interleaved(sides: dict[str, Callable[[], Result]], rounds: int) -> dict[str, list[Result]]:
    """Run every side once a round for `rounds` rounds, in the order given in even rounds and reversed in odd ones
    (A B C, C B A, A B C, ...), so that a drift of the machine's speed falls on every side alike; returns each
    side's results in round order."""
    results: dict[str, list[Result]] = {name: [] for name in sides}
    for number in range(rounds):
        for name in list(sides)[:: 1 if number % 2 == 0 else -1]:
            log.info("round %d of %d: %s ...", number + 1, rounds, name)
            results[name].append(sides[name]())
            log.info("round %d of %d: %s: %s", number + 1, rounds, name, results[name][-1])
    return results


def per_round(numerators: list[float], denominators: list[float]) -> list[float]:
    """Each round's ratio of two sides measured in the same round."""
    return [n / d for n, d in zip(numerators, denominators, strict=True)]


@dataclass(frozen=True)
class Target:
    """A figure's bound: at least `bound` (at_least) or at most."""

    bound: float
    at_least: bool = True

    def met(self, value: float) -> bool:
        return value >= self.bound if self.at_least else value <= self.bound


def summarise(rounds: dict[str, list[float]], targets: dict[str, Target], digits: int = 4) -> dict:
    """Each figure's median over its rounds (the key the figure always had), its spread under "spread" (min, max
    and every round's value), and the verdict from the medians: `meets_targets`, with `unsure` naming the figures
    whose rounds fall on both sides of their target (a rerun may judge those the other way)."""
    summary: dict = {name: round(statistics.median(values), digits) for name, values in rounds.items()}
    summary["spread"] = {
        name: {
            "min": round(min(values), digits),
            "max": round(max(values), digits),
            "rounds": [round(value, digits) for value in values],
        }
        for name, values in rounds.items()
    }
    summary["meets_targets"] = all(target.met(summary[name]) for name, target in targets.items())
    summary["unsure"] = [
        name for name, target in targets.items() if len({target.met(value) for value in rounds[name]}) > 1
    ]
    return summary


def bare_trainer(steps: int, callbacks: list) -> Any:
    """A Lightning Trainer of `steps` steps on the CPU with nothing else: no logger, checkpoints, progress bar,
    model summary or validation, so that what a bench times is training."""
    import lightning as L  # here: not every bench trains

    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )

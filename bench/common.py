"""What every benchmark script shares: where it works, and its final JSON line."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path


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

"""`@command("train")`: what makes a function one of the project's command lines.

The function gets the composed config as its schema's dataclass, checked (rag_lightning.config),
with the renamed groups' old names accepted on the command line; a user error or a stop signal
ends it with one line (rag_lightning.errors).
"""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import DictConfig

from rag_lightning.config import CONF_DIR, checked, register_configs, with_current_names
from rag_lightning.errors import exit_on_user_error


def command(config_name: str) -> Callable[[Callable[[Any], None]], Callable[[], None]]:
    """Make `run(cfg)` a command composed from conf/<config_name>.yaml and the command-line overrides."""
    register_configs()

    def decorate(run: Callable[[Any], None]) -> Callable[[], None]:
        @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)
        @exit_on_user_error
        @functools.wraps(run)       # Hydra names the job (and its log file) after the wrapped function's module
        def run_checked(cfg: DictConfig) -> None:
            run(checked(cfg))

        @functools.wraps(run)
        def main() -> None:
            sys.argv[1:] = with_current_names(sys.argv[1:])
            run_checked()
        return main
    return decorate

"""`@command("train")`: what makes a function one of the project's command lines.

Every entry module makes its `main` so: `main = command("train")(train)`. The function gets the composed config
as its schema's dataclass, its settings checked (rag_lightning.config), then what they name (rag_lightning.
preflight); a user error or a stop signal ends it with one line (rag_lightning.errors), and so does an override
Hydra cannot compose (a misspelled key, a value of the wrong type, an unknown option of a group).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from dataclasses import is_dataclass
from typing import Any

import hydra
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from rag_lightning.config import CONF_PATH, checked, not_a_setting, register_configs
from rag_lightning.errors import exit_on_user_error
from rag_lightning.preflight import preflight

# What Hydra raises while composing the config from the command line, before the command runs
COMPOSITION_ERRORS = (ConfigCompositionException, OverrideParseException)


def command(config_name: str) -> Callable[[Callable[[Any], Any]], Callable[[], None]]:
    """Make `run(cfg)` a command composed from conf/<config_name>.yaml and the command-line overrides."""
    register_configs()

    def decorate(run: Callable[[Any], Any]) -> Callable[[], None]:
        @hydra.main(version_base="1.3", config_path=CONF_PATH, config_name=config_name)
        @exit_on_user_error
        @functools.wraps(run)  # Hydra names the job (and its log file) after the wrapped function's module
        def run_checked(cfg: DictConfig) -> None:
            run(preflight(checked(cfg)))

        @functools.wraps(run)
        def main() -> None:
            # Hydra prints a composition error in several lines and exits 1, unless HYDRA_FULL_ERROR lets the
            # exception through to here
            os.environ.setdefault("HYDRA_FULL_ERROR", "1")
            try:
                run_checked()
            except COMPOSITION_ERRORS as e:
                print(f"error: {composition_error(e)}", file=sys.stderr, flush=True)
                sys.exit(2)

        return main

    return decorate


def composition_error(error: Exception) -> str:
    """One line for an override Hydra could not compose, naming the key or the override."""
    if isinstance(error, OverrideParseException):
        return f"{error.override}: not an override Hydra can read ({error.message.splitlines()[0]})"
    if isinstance(error, MissingConfigException) and error.options is not None:
        group, _, option = (error.missing_cfg_file or "").rpartition("/")
        return f"{group}={option}: no such option; {group} is one of {', '.join(error.options)}"
    cause = error.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and is_dataclass(cause.object_type):
        return str(not_a_setting(cause.full_key or "", cause.object_type))
    if isinstance(cause, OmegaConfBaseException) and cause.full_key:
        return f"{cause.full_key}: {str(cause).splitlines()[0]}"
    return str(error).splitlines()[0]

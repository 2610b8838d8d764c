"""Logging for fedtune's processes: fedtune's own progress lines on stderr, library chatter a
user cannot act on silenced unless ``--verbose``. Used by the CLI, the deployed ServerApp and the
device worker (it lives here, below all of them)."""

from __future__ import annotations

import logging
import os
import sys
import warnings

log = logging.getLogger("fedtune")


def setup_logging(verbose: bool, quiet: bool = False) -> None:
    for old in list(log.handlers):  # main() may run more than once in a process (tests)
        log.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet and not verbose else logging.INFO)
    log.propagate = False
    if verbose:
        logging.basicConfig(level=logging.INFO)
        return
    quiet_libraries()


def quiet_libraries() -> None:
    """Silence library chatter a user cannot act on (also used by the deployed ServerApp and
    the device worker, whose output is streamed to the operator)."""
    for name in (
        "flwr",
        "ray",
        "transformers",
        "accelerate",
        "torchao",
        "bitsandbytes",
        "peft",
        "torch.utils._pytree",
        "absl",  # dp-accounting: "order excluded" notes that do not change the guarantee
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Library deprecation chatter (Ray, torchao, transformers) is not the user's to act on.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

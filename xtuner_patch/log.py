"""The ``xtuner_patch`` logger, and its warnings given once per process."""

import logging

from kernels.backend import warn_once as _warn_once

logger = logging.getLogger("xtuner_patch")


def warn_once(message: str, *args) -> None:
    """Warn ``message % args`` on the ``xtuner_patch`` logger the first time it comes up."""
    _warn_once(message, *args, log=logger)

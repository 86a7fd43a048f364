"""Library notices a user cannot act on, kept out of a run's output."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

_CAST_LOGGER = "diffusers.models.modeling_utils"
_BACKEND_LOGGER = "transformers.utils.import_utils"


def _not_a_backend_notice(record: logging.LogRecord) -> bool:
    """False for transformers' notice, on the first use of an image processor, that torchvision is missing and
    the PIL implementation runs instead: distlin's pipelines need nothing from torchvision."""
    return "requires torchvision" not in record.getMessage()


def drop_backend_notices() -> None:
    """Keep transformers' torchvision notices out of every entry point and the Python API. Torch-free (the
    filter sits on the logger by name, before transformers is imported), so ``import distlin`` applies it."""
    logger = logging.getLogger(_BACKEND_LOGGER)
    if _not_a_backend_notice not in logger.filters:
        logger.addFilter(_not_a_backend_notice)


def _not_a_cast_notice(record: logging.LogRecord) -> bool:
    """False for diffusers' notice on every ``ModelMixin.to(dtype)`` of a model without float32 modules (it lists
    none): the float32 VAE between cascade stages would print it twice per stage, the IP-Adapter loader once."""
    return "should be kept in float32" not in record.getMessage()


def _not_a_truncation_notice(record: logging.LogRecord) -> bool:
    """False for diffusers' notice that a prompt was cut at the text encoder's length: it quotes the whole cut
    text (100 KB of prompt, 100 KB of stderr); :func:`distlin.run.warn_long_prompt` says it in one line."""
    return "was truncated because" not in record.getMessage()


@contextmanager
def without_cast_notice() -> Iterator[None]:
    """diffusers' dtype-cast notice dropped meanwhile (and still after, where :func:`quiet_third_party` ran)."""
    logger = logging.getLogger(_CAST_LOGGER)
    added = _not_a_cast_notice not in logger.filters
    logger.addFilter(_not_a_cast_notice)
    try:
        yield
    finally:
        if added:
            logger.removeFilter(_not_a_cast_notice)


def quiet_third_party() -> None:
    """For a command-line run or the web app: transformers' notices (its optional torchvision, its over-long
    prompt notice, which :func:`distlin.run.warn_long_prompt` replaces), diffusers' FutureWarnings, its
    dtype-cast notice and its own over-long prompt notice stay out of the output."""
    import transformers
    from diffusers.utils import logging as diffusers_logging

    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")
    warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")
    logging.getLogger(_CAST_LOGGER).addFilter(_not_a_cast_notice)
    diffusers_logging.get_logger("diffusers")  # sets up diffusers' handler, which every pipeline's records reach
    for handler in logging.getLogger("diffusers").handlers:  # a handler's filter sees the child loggers' records
        if _not_a_truncation_notice not in handler.filters:
            handler.addFilter(_not_a_truncation_notice)

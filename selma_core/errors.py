"""Errors that carry the job contract's exit codes.

A job exits 0 when done, 2 when its configuration or input is invalid (retrying cannot help, so a
Kubernetes ``podFailurePolicy`` fails the Job at once), and 1 for anything worth retrying.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RETRYABLE = 1
EXIT_INVALID = 2


class SelmaError(Exception):
    """Base class; ``exit_code`` says whether a retry can help."""

    exit_code = EXIT_RETRYABLE


class ConfigError(SelmaError):
    """A configuration or skill file is missing or invalid."""

    exit_code = EXIT_INVALID


class InputError(SelmaError):
    """A phase's input is unusable (too few prompts, empty image set, missing upstream output)."""

    exit_code = EXIT_INVALID


class EndpointError(SelmaError):
    """A remote service (S3, MLflow, an LLM API) could not be reached or kept failing."""

    exit_code = EXIT_RETRYABLE

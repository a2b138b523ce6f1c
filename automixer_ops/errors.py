"""Errors a user can act on. The CLI prints their message on one line and exits non-zero, no traceback.

Exit statuses (cli.py): 0 done; EXIT_BAD_INPUT (2) for bad input or settings, where running
the same command again cannot help; EXIT_TRANSIENT (75, sysexits' EX_TEMPFAIL) for a condition
that passes by itself (another process holds the lock, a fit is running), where the Airflow
launcher retries the task.
"""

EXIT_BAD_INPUT = 2
EXIT_TRANSIENT = 75


class AutomixerError(Exception):
    """Bad input or settings: the message names the file, line, field or key at fault."""


class ConfigError(AutomixerError):
    pass


class CorpusError(AutomixerError):
    pass


class TransientError(AutomixerError):
    """The step cannot run now but may later, unchanged (a lock held by another writer): exit 75, retried."""

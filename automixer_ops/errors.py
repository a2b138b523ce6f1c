"""Errors a user can act on. The CLI prints their message and exits non-zero, no traceback."""


class AutomixerError(Exception):
    """Bad input or settings: the message names the file, line, field or key at fault."""


class ConfigError(AutomixerError):
    pass


class CorpusError(AutomixerError):
    pass

"""The one error class every layer's user errors share."""


class UserError(ValueError):
    """Something the user changes (a config key, a file, a folder), not a bug: the message names it
    and says what to do. Every rank raises the same one (`JobGroup.from_main` hands it to all), and
    the command line prints it as one line, without a traceback, and exits 2. Each layer has its own
    kind: ConfigError (config), DataError (data), WeightsError (models), CheckpointError (train)."""

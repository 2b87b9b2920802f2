"""The one error type a user sees: a one-line message, exit code 2, no traceback."""


class LabError(Exception):
    """Bad input from the user (config, command line, files). `lab` prints `error: <message>` and exits 2."""

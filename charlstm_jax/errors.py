"""The one exception type for mistakes a user can make and mend."""


class UserError(Exception):
    """Bad input (path, text, config value, prompt): the message is one sentence on what to do.

    Scripts print it without a traceback and exit with status 2.
    """

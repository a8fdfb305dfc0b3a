"""The one kind of engine error a user is shown as its message alone."""


class SetupError(Exception):
    """The engine cannot start for a reason its message states in full, with what to do (a model that cannot
    be read, a plan that does not fit): the command line and the worker print the message, no traceback."""

"""One exception type for everything a user can get wrong: the CLI prints its message as one line."""


class NanogemmaError(Exception):
    """Bad input or an unusable file. The message says what is wrong and what to do."""

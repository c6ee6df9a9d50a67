"""The error a data loader raises for a bad record met while training."""


class DataError(ValueError):
    """A record the loader cannot use (label out of range, wrong image size, ...).

    The message is one line naming the dataset file (and record) and the fix. The
    trainer turns it into that line on stderr and exit code 5 instead of a traceback.
    """

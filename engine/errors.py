"""Errors a user can act on. Each names the file, key or value and what is wrong."""


class KDError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""


class DataError(KDError):
    pass


class CacheMismatchError(KDError):
    pass


class CheckpointError(KDError):
    pass


class DivergedError(KDError):
    pass

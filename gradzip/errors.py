"""gradzip's exception types: one base class so callers catch a single type."""


class GradzipError(Exception):
    """Base class for every error gradzip raises on purpose."""


class CorruptStreamError(GradzipError):
    """A .grz stream (or an encoded section inside it) is truncated or damaged."""


class StateMismatchError(GradzipError):
    """The predictor state does not match the one a stream was encoded against."""


class InputError(GradzipError):
    """A user input (file, tensor, option) cannot be used."""


class GradzipWarning(UserWarning):
    """Something changed that gradzip handled, but the user should know (e.g. a reshaped tensor)."""

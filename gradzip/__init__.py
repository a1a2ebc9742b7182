"""gradzip: error-bounded lossy compression of per-round gradient dumps from federated training."""

__version__ = "0.1.0"

from .api import Compressor, Decompressor, GradzipWarning  # noqa: E402
from .errors import CorruptStreamError, GradzipError, InputError, StateMismatchError  # noqa: E402

__all__ = ["Compressor", "Decompressor", "GradzipError", "CorruptStreamError", "StateMismatchError",
           "InputError", "GradzipWarning", "__version__"]

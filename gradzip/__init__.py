"""gradzip: error-bounded lossy compression of per-round gradient dumps from federated training."""

__version__ = "0.1.0"

from .errors import CorruptStreamError, GradzipError, InputError, StateMismatchError  # noqa: E402
from .kernel_cache import drop_stale_kernels  # noqa: E402

drop_stale_kernels()  # before any kernel loads from the cache

__all__ = ["Compressor", "Decompressor", "GradzipError", "CorruptStreamError", "StateMismatchError",
           "InputError", "GradzipWarning", "__version__"]
_FROM_API = ("Compressor", "Decompressor", "GradzipWarning")


def __getattr__(name):
    # The API (numpy, numba) loads on first use, so the `gradzip` command can set the BLAS
    # thread count (gradzip/blas.py) before numpy starts.
    if name in _FROM_API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

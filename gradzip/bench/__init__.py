"""`gradzip bench`: gradzip against SZ3, ZFP, QSGD and zstd on the same tensors at the same bound.

    methods   one small adapter per method (gradzip and its ablations, SZ3 x3, ZFP, QSGD, zstd)
    runner    runs every method over one client's rounds, per error bound; sizes, speed, errors, memory
    commtime  the communication-time model (compress + send + decompress vs sending raw)
    plot      the PNG (matplotlib, imported only when plotting)
    cli       the click command, registered on `gradzip` in gradzip/cli.py

Nothing here is imported by `gradzip` itself except the thin click command, and the heavy
packages (pysz, zfpy, matplotlib, tracemalloc) are imported inside functions.
"""

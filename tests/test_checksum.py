"""XXH64, the reconstruction and state checksum: reference vectors (from the xxhash
package, the reference implementation's binding) and streaming over arbitrary splits."""
import numpy as np
import pytest

from gradzip.checksum import Xxh64, fingerprint, xxh64


def pattern(n: int) -> bytes:
    return bytes((i * 131 + 7) % 256 for i in range(n))


# (data, seed, XXH64) as the reference implementation computes them.
VECTORS = [
    (b'', 0x0, 0xef46db3751d8e999),
    (b'a', 0x0, 0xd24ec4f1a98c6e5b),
    (b'abc', 0x0, 0x44bc2cf5ad770999),
    (pattern(3), 0x0, 0xbed43740ee6332bb),
    (pattern(3), 0xffffffffffffffff, 0x50127e93a7b8310d),
    (pattern(4), 0x0, 0xfa212ae44b3bb23d),
    (pattern(4), 0xffffffffffffffff, 0x7ebce9bbe6f6eebd),
    (pattern(7), 0x0, 0x2744460dd675d2c0),
    (pattern(7), 0xffffffffffffffff, 0x6f0993bd5d623d42),
    (pattern(8), 0x0, 0x994b676b71ce94dd),
    (pattern(8), 0xffffffffffffffff, 0x23470c129cfb3dc4),
    (pattern(12), 0x0, 0xb92f588ce720786e),
    (pattern(12), 0xffffffffffffffff, 0x612c418a90c4b80d),
    (pattern(31), 0x0, 0x6711d55e306b5d8f),
    (pattern(31), 0xffffffffffffffff, 0x0559625f4e0afe08),
    (pattern(32), 0x0, 0x07f7b8e3bc5d6e25),
    (pattern(32), 0xffffffffffffffff, 0xd5db58b1a19eefb2),
    (pattern(33), 0x0, 0x09f85eeb4e1cbe9f),
    (pattern(33), 0xffffffffffffffff, 0x303c4a232c3bd093),
    (pattern(63), 0x0, 0xb7c9968c066cb6a5),
    (pattern(63), 0xffffffffffffffff, 0x5b30f335733619ab),
    (pattern(64), 0x0, 0x50d4159a0411632e),
    (pattern(64), 0xffffffffffffffff, 0xb59713bee12a76bd),
    (pattern(100), 0x0, 0x9ddada11d3dc2d8f),
    (pattern(100), 0xffffffffffffffff, 0x8b8b9e7c59f840e0),
    (pattern(1000), 0x0, 0x0bf0bdbcc82eb373),
    (pattern(1000), 0xffffffffffffffff, 0x2ebd51d295f7ea0b),
]


@pytest.mark.parametrize("data, seed, expected", VECTORS)
def test_reference_vectors(data, seed, expected):
    assert xxh64(data, seed) == expected
    assert xxh64(np.frombuffer(data, np.uint8), seed) == expected


@pytest.mark.parametrize("data, seed, expected", [v for v in VECTORS if len(v[0]) >= 31])
def test_streaming_over_every_split_matches_the_whole(data, seed, expected):
    for cut in range(len(data) + 1):
        assert Xxh64(seed).update(data[:cut]).update(memoryview(data)[cut:]).digest() == expected, cut


def test_unaligned_and_multi_part_inputs_match_one_piece():
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, 100_003, dtype=np.uint8).tobytes()
    unaligned = np.frombuffer(b"\x00" + data, np.uint8)[1:]
    assert unaligned.ctypes.data % 8 != 0
    whole = xxh64(data)
    assert xxh64(unaligned) == whole
    cuts = sorted(rng.integers(0, len(data), 6).tolist())
    parts = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
    assert fingerprint(parts) == whole.to_bytes(8, "little")
    # A float array hashes as its bytes.
    floats = rng.normal(size=1000).astype(np.float32)
    assert xxh64(floats) == xxh64(floats.tobytes())


def test_one_flipped_bit_changes_the_digest():
    data = bytearray(pattern(4096))
    whole = xxh64(bytes(data))
    for position in (0, 31, 32, 2047, 4095):
        data[position] ^= 0x10
        assert xxh64(bytes(data)) != whole
        data[position] ^= 0x10



def test_fingerprint_joins_small_parts_without_changing_the_digest():
    rng = np.random.default_rng(4)
    sizes = [0, 3, 31, 4096, 70_000, 5, 65_535, 65_536, 200_001, 17]  # below and above the join threshold
    parts = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    whole = b"".join(p.tobytes() for p in parts)
    assert fingerprint(parts) == xxh64(whole).to_bytes(8, "little")
    assert fingerprint([bytes(p) for p in parts]) == fingerprint(parts)


def test_streaming_in_many_small_pieces_matches_the_whole():
    """Pieces shorter than a stripe, and pieces that fill the held bytes exactly, straddle
    them or leave them empty, in every order."""
    rng = np.random.default_rng(11)
    data = rng.integers(0, 256, 5_000, dtype=np.uint8).tobytes()
    for trial in range(40):
        stream, at = Xxh64(trial), 0
        while at < len(data):
            size = int(rng.choice([0, 1, 3, 31, 32, 33, 64, 100]))
            stream.update(data[at:at + size])
            at += size
        assert stream.digest() == xxh64(data, trial), trial

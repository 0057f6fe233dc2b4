"""Named quantization schemes: what `press` calls a scheme, independent of the library doing the math.

  int8   weight-only; int8 values with one float32 scale per output channel (symmetric,
         round to nearest). About 1/2 of the bf16 bytes of the quantized matrices.

More schemes (group-wise int4, calibrated int4, int8 activations, int8 KV cache) join this
table as they are implemented; an unknown name fails listing the ones that exist.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Scheme:
    name: str
    weight_bits: int  # bits of the stored integer weights
    description: str
    # Parameters left in float, by projection name (the LM head is most sensitive; the
    # embedding table is a lookup, not a matmul, and always stays float).
    keep_float: tuple[str, ...] = ("lm_head",)

    @property
    def qmax(self) -> int:
        return 2 ** (self.weight_bits - 1) - 1


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("int8", 8, "int8 weights, one scale per output channel (symmetric, round to nearest)"),
    )
}


def get(name: str) -> Scheme:
    """The scheme called `name`; ValueError listing the valid names otherwise."""
    try:
        return SCHEMES[name]
    except KeyError:
        valid = ", ".join(f"{s.name} ({s.description})" for s in SCHEMES.values())
        raise ValueError(f"unknown quantization scheme {name!r}; valid schemes: {valid}") from None

"""Named quantization schemes: what `press` calls a scheme, independent of the library doing the math.

  int8            weight-only; int8 values, one float32 scale per output channel (symmetric,
                  round to nearest). About 1/2 of the bf16 bytes of the quantized matrices.
  int4-gN         weight-only; int4 values with one float16 scale per group of N consecutive
                  input channels of each output channel (N = 32, 64, 128; N must divide the
                  input width). Symmetric, round to nearest. About 0.28 (g32) of bf16.
  int4-gN-asym    the same with a float16 offset per group as well (w = scale * q + offset,
                  q in 0..15), as GGUF's Q4_1 stores it.
  gptq-int4-gN    int4-gN storage whose integers are chosen by GPTQ calibration (second-order
                  error compensation over calibration sequences); `-asym` works here too.
  w8a8            int8 weights (per output channel) and int8 activations quantized
                  dynamically, one scale per token; the matmul itself is int8 x int8.
  w4a8-gN[-asym]  int4-gN[-asym] weights and int8 activations quantized dynamically, one
                  step per group of N inputs of a token (GGUF's Q4_1 against Q8_1): each
                  group's product is int4 x int8 (integer dot products on AVX-512 or AVX2
                  CPUs, for decoding; compress/kernels/cpu.cc).
  w8a8-gN         int8 weights (per output channel) and int8 activations quantized dynamically,
                  one step per group of N inputs of a token (as GGUF's Q8_0 rounds them): each
                  group's product is int8 x int8 (integer dot products on AVX2 and AVX-512 VNNI
                  CPUs, for decoding; compress/kernels/cpu.cc).
  smooth-w8a8     w8a8 after SmoothQuant (compress/quant/smooth.py): calibration text sets
                  per-channel factors that move activation outliers into the weights.
  kv-int8         an int8 key/value cache with one scale per token and key/value head.
                  Combines with any of the above: 'int4-g64+kv-int8'; alone it leaves the
                  weights float.

  embed-int8      the embedding table and the LM head (tied or not) in int8, one scale per
  embed-int4-gN   vocabulary entry; or int4 with a scale per group of N (`-asym`: and an
                  offset), rounded to nearest. Added to a weight scheme: 'int8+embed-int8',
                  'int4-g32+embed-int4-g32'. The table is stored once, as the tied head's kernel
                  [D, V] (compress/quant/weights.py); a lookup dequantizes only its rows.

Which projections stay float is a list of name patterns over parameter paths
(`fnmatch`, e.g. 'lm_head', 'layers/down', 'layers/*'); by default the LM head does, and the
embedding table does too, unless an embed-* option quantizes both.
"""

from __future__ import annotations

import dataclasses

from compress.errors import InputError

GROUP_SIZES = (32, 64, 128)
KV_SUFFIX = "kv-int8"
EMBED_PREFIX = "embed-"
DEFAULT_KEEP_FLOAT = ("lm_head",)


@dataclasses.dataclass(frozen=True)
class Scheme:
    name: str
    weight_bits: int | None  # bits of the stored integer weights; None leaves weights float
    description: str
    group_size: int | None = None  # input channels per scale; None: one scale per output channel
    zero_point: bool = False  # asymmetric groups: a float offset per group as well
    calibration: str | None = None  # None: round to nearest; 'gptq': GPTQ; 'smoothquant': smoothed, then rounded
    activation_bits: int | None = None  # dynamic activation quantization: per token (w8a8), per group (w4a8)
    activation_group: int | None = None  # inputs per activation step of w8a8-gN (w4a8's are its weight groups)
    kv_bits: int | None = None  # integer key/value cache
    keep_float: tuple[str, ...] = DEFAULT_KEEP_FLOAT  # fnmatch patterns of projections left float
    embed: "Scheme | None" = None  # the embedding table's and the LM head's grid (None: both float)

    @property
    def qmax(self) -> int:
        """Largest magnitude of a symmetric integer (127 for int8, 7 for int4)."""
        return 2 ** (self.weight_bits - 1) - 1

    @property
    def levels(self) -> int:
        """Number of integer values of an asymmetric code (16 for int4)."""
        return 2**self.weight_bits

    @property
    def quantizes_weights(self) -> bool:
        return self.weight_bits is not None

    def with_keep_float(self, patterns) -> "Scheme":
        return dataclasses.replace(self, keep_float=tuple(patterns))

    def storage(self) -> dict:
        """What a quantized directory records so that loading rebuilds this scheme."""
        return {"scheme": self.name, "keep_float": list(self.keep_float)}


def _weight_schemes() -> dict[str, Scheme]:
    table = [
        Scheme("int8", 8, "int8 weights, one scale per output channel (symmetric, round to nearest)"),
        Scheme("w8a8", 8, "int8 weights per output channel and int8 activations per token (dynamic)", activation_bits=8),
        Scheme("smooth-w8a8", 8, "w8a8 after SmoothQuant moves activation outliers into the weights (calibrated)",
               activation_bits=8, calibration="smoothquant"),
    ]
    for n in GROUP_SIZES:
        table += [
            Scheme(f"int4-g{n}", 4, f"int4 weights, a scale per {n} inputs (symmetric, round to nearest)", group_size=n),
            Scheme(f"int4-g{n}-asym", 4, f"int4 weights, a scale and offset per {n} inputs (round to nearest)",
                   group_size=n, zero_point=True),
            Scheme(f"w4a8-g{n}", 4, f"int4-g{n} weights and int8 activations, a step per {n} inputs (dynamic)",
                   group_size=n, activation_bits=8),
            Scheme(f"w4a8-g{n}-asym", 4, f"int4-g{n}-asym weights and int8 activations, a step per {n} inputs (dynamic)",
                   group_size=n, zero_point=True, activation_bits=8),
            Scheme(f"w8a8-g{n}", 8, f"int8 weights per output channel and int8 activations, a step per {n} inputs "
                   "(dynamic)", activation_bits=8, activation_group=n),
            Scheme(f"gptq-int4-g{n}", 4, f"int4 weights, a scale per {n} inputs, integers chosen by GPTQ",
                   group_size=n, calibration="gptq"),
            Scheme(f"gptq-int4-g{n}-asym", 4, f"int4 weights, a scale and offset per {n} inputs, chosen by GPTQ",
                   group_size=n, zero_point=True, calibration="gptq"),
        ]
    return {s.name: s for s in table}


SCHEMES = _weight_schemes()


EMBED_SCHEMES = tuple(name for name, s in SCHEMES.items() if s.calibration is None and s.activation_bits is None)


def names() -> list[str]:
    """Every valid scheme name (each weight scheme may also take '+kv-int8' and '+embed-...')."""
    return [*SCHEMES, KV_SUFFIX, *(EMBED_PREFIX + name for name in EMBED_SCHEMES)]


def get(name: str) -> Scheme:
    """The scheme called `name` ('int8', 'int4-g64+kv-int8', 'kv-int8', ...).

    Raises ValueError listing the valid names for anything else.
    """
    parts = name.split("+") if isinstance(name, str) else [name]
    kv = KV_SUFFIX in parts
    embeds = [p for p in parts if p.startswith(EMBED_PREFIX)]
    weights = [p for p in parts if p != KV_SUFFIX and p not in embeds]
    if (len(weights) > 1 or parts.count(KV_SUFFIX) > 1 or (weights and weights[0] not in SCHEMES) or len(embeds) > 1
            or (embeds and (not weights or embeds[0][len(EMBED_PREFIX):] not in EMBED_SCHEMES))):
        valid = "; ".join(f"{s.name} ({s.description})" for s in SCHEMES.values())
        raise InputError(
            f"unknown quantization scheme {name!r}; valid schemes: {valid}; {KV_SUFFIX} (int8 key/value cache), "
            f"alone or added to a weight scheme as NAME+{KV_SUFFIX}; the embedding table and LM head quantized as "
            f"well, added to a weight scheme as NAME+{EMBED_PREFIX}E with E one of {', '.join(EMBED_SCHEMES)}"
        )
    if not weights:
        return Scheme(KV_SUFFIX, None, "float weights, int8 key/value cache (a scale per token and head)", kv_bits=8)
    scheme = SCHEMES[weights[0]]
    if embeds:
        table = SCHEMES[embeds[0][len(EMBED_PREFIX):]]
        scheme = dataclasses.replace(scheme, embed=table,
                                     description=f"{scheme.description}; embeddings and LM head: {table.description}")
    if kv:
        scheme = dataclasses.replace(scheme, kv_bits=8, description=scheme.description + ", int8 key/value cache")
    return dataclasses.replace(scheme, name=name)

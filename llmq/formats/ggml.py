"""llama.cpp's block formats (ggml's Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) as
llmq number formats, so that RTN, GPTQ and the mixed-precision allocator choose codes on exactly the grid llama.cpp
stores, and a checkpoint holds llama.cpp's block bytes as they are (`llmq export --to gguf` copies them).

Blocks run along in_features (a row of the weight is a GGUF row). Each block of `block` columns holds groups of
`group` columns; every group has an effective scale S and either a fixed zero point z (value S·(q - z)) or an
offset O (value S·q + O). Where they come from (ggml-common.h; decoded as gguf-py's `gguf.quants` does, in the same
float32 operations, so the two agree bit for bit):

    Q4_0  32 cols, 18 B: fp16 d, 16 B nibbles                     S = d, z = 8
    Q4_1  32 cols, 20 B: fp16 d, fp16 m, nibbles                  S = d, O = m
    Q5_0  32 cols, 22 B: fp16 d, 4 B 5th bits, nibbles            S = d, z = 16
    Q5_1  32 cols, 24 B: fp16 d, fp16 m, 5th bits, nibbles        S = d, O = m
    Q8_0  32 cols, 34 B: fp16 d, int8[32]                         S = d, z = 128 (llmq code = int8 + 128)
    Q2_K  256 cols (16 groups of 16), 84 B: 4-bit sc and 4-bit m per group, fp16 d, dmin    S = d·sc, O = -dmin·m
    Q3_K  256 cols (16 of 16), 110 B: 6-bit signed sc per group, fp16 d                      S = d·(sc-32), z = 4
    Q4_K  256 cols (8 of 32), 144 B: 6-bit sc and 6-bit m per group, fp16 d, dmin            S = d·sc, O = -dmin·m
    Q5_K  256 cols (8 of 32), 176 B: as Q4_K with 5-bit codes                               S = d·sc, O = -dmin·m
    Q6_K  256 cols (16 of 16), 210 B: int8 sc per group, fp16 d                              S = d·sc, z = 32

The group parameters of a K-quant are double-quantized along the row (one fp16 d per 256 columns), so they are fixed
for the whole weight before any code is chosen (GPTQ runs these formats with static groups). Sym formats take a
signed scale (the largest-magnitude weight of a group lands exactly on the grid's longer end, as llama.cpp does),
except Q8_0, whose scale is max|w| / 127 as in llama.cpp: a tensor already on a Q8_0 grid re-quantizes to its own
codes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType as QT

F16 = torch.float16


@dataclass(frozen=True)
class BlockType:
    name: str  # llmq's format name, e.g. "q4_k"
    qtype: QT  # GGUF tensor type
    bits: int
    block: int  # columns per block
    group: int  # columns per scale
    type_size: int  # bytes per block
    zero: int  # fixed zero point (0 for offset types)
    offset: bool  # a per-group offset O instead of a zero point
    sc_bits: int = 0  # K-quants: width of the per-group scale (and min) codes
    clamp_min: bool = False  # K offset types keep 0 inside every group's range (O <= 0)
    absmax_div: int = 0  # Q8_0: S = max|w| / 127 as llama.cpp (so a Q8_0 tensor re-quantizes to itself)

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def k_quant(self) -> bool:
        return self.sc_bits > 0

    def row_bytes(self, cols: int) -> int:
        return cols // self.block * self.type_size

    # ---- parameters ---------------------------------------------------------------------------
    def find_params(self, Wg: torch.Tensor, mask, scheme, shrink=1.0):
        """Wg [Rs, G, group] -> (S [Rs, G], O [Rs, G] or None), before the block's own storage rounding."""
        if self.offset:
            lo, hi = Wg.amin(-1), Wg.amax(-1)
            if self.clamp_min:
                lo, hi = lo.clamp(max=0), hi.clamp(min=0)
            lo, hi = lo * shrink, hi * shrink
            return (hi - lo) / self.maxq, lo
        if self.absmax_div:
            return Wg.abs().amax(-1) * shrink / self.absmax_div, None
        i = Wg.abs().argmax(-1, keepdim=True)
        signed_max = Wg.gather(-1, i).squeeze(-1)
        return signed_max * shrink / -self.zero, None

    def store(self, S: torch.Tensor, O: torch.Tensor | None):
        """Raw S, O [R, G] -> (effective S, effective O or None, the stored parameters by name)."""
        R, G = S.shape
        if not self.k_quant:
            d = _f16_away_from_zero(S)
            side = {"d": d}
            eff_o = None
            if self.offset:
                m = _f16_down(O)
                side["m"] = m
                eff_o = m.float()
            return d.float(), eff_o, side
        nb = G * self.group // self.block
        Sb = S.reshape(R, nb, -1)
        top = (1 << self.sc_bits) - 1
        if self.offset:  # Q2_K, Q4_K, Q5_K: unsigned scales and mins under d, dmin
            d = (Sb.amax(-1) / top).to(F16)
            sc = _codes(Sb, d, 0, top)
            mn = (-O).reshape(R, nb, -1)
            dmin = (mn.amax(-1) / top).to(F16)
            m = _codes(mn, dmin, 0, top)
            eff_s = (d.float().unsqueeze(-1) * sc.float()).reshape(R, G)
            eff_o = -(dmin.float().unsqueeze(-1) * m.float()).reshape(R, G)
            return eff_s, eff_o, {"d": d, "dmin": dmin, "sc": sc.reshape(R, G), "m": m.reshape(R, G)}
        half = 1 << (self.sc_bits - 1)  # Q3_K (6-bit), Q6_K (8-bit): signed scales, the largest at -half
        i = Sb.abs().argmax(-1, keepdim=True)
        d = (Sb.gather(-1, i).squeeze(-1) / -half).to(F16)
        sc = _codes(Sb, d, -half, half - 1)
        eff_s = (d.float().unsqueeze(-1) * sc.float()).reshape(R, G)
        return eff_s, None, {"d": d, "sc": sc.reshape(R, G)}

    # ---- codes --------------------------------------------------------------------------------
    def encode(self, W, S, O, scheme=None) -> torch.Tensor:
        x = W if O is None else W - O
        c = torch.round(x / S) + self.zero
        c = torch.where(S != 0, c, torch.full_like(c, float(self.zero)))
        return c.clamp(0, self.maxq).to(torch.uint8)

    def decode(self, c, S, O, scheme=None) -> torch.Tensor:
        v = S * (c.to(torch.float32) - self.zero)
        return v if O is None else v + O

    # ---- block bytes --------------------------------------------------------------------------
    def pack(self, codes: torch.Tensor, side: dict[str, torch.Tensor]) -> torch.Tensor:
        """codes [R, C] uint8 and the stored parameters -> uint8 [R, C/block*type_size], llama.cpp's blocks."""
        R, C = codes.shape
        nb = C // self.block
        c = codes.to(torch.int32).reshape(R, nb, self.block)
        fields = []
        for kind, arg in _LAYOUT[self.name]:
            if kind == "f16":
                fields.append(side[arg].contiguous().view(torch.uint8).reshape(R, nb, 2))
            elif kind == "bits":
                emap, width, shift = arg
                fields.append(_pack_bits(c, emap, width, shift))
            elif kind == "int8":
                fields.append((c - 128).to(torch.int8).view(torch.uint8))
            else:  # per-group scale codes
                fields.append(_pack_scales(self, side, R, nb))
        out = torch.cat(fields, dim=-1)
        assert out.shape[-1] == self.type_size, (self.name, out.shape)
        return out.reshape(R, nb * self.type_size)

    def unpack(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """uint8 [R, nb*type_size] -> (codes [R, C] uint8, effective S [R, G], effective O [R, G] or None)."""
        codes, side = self._fields(raw)
        R, nb = raw.shape[0], raw.shape[1] // self.type_size
        G = nb * self.block // self.group
        if not self.k_quant:
            return codes, side["d"].float(), side["m"].float() if self.offset else None
        d = side["d"].float().unsqueeze(-1)
        sc = side["sc"].float().reshape(R, nb, -1)
        S = (d * sc).reshape(R, G)
        if not self.offset:
            return codes, S, None
        O = -(side["dmin"].float().unsqueeze(-1) * side["m"].float().reshape(R, nb, -1)).reshape(R, G)
        return codes, S, O

    def repack(self, raw: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """The blocks `raw` with new codes [R, C] and every stored scale as it was."""
        return self.pack(codes, self._fields(raw)[1])

    def _fields(self, raw: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """uint8 [R, nb*type_size] -> (codes [R, C] uint8, the stored parameters by name, as `pack` takes them)."""
        R = raw.shape[0]
        nb = raw.shape[1] // self.type_size
        b = raw.reshape(R, nb, self.type_size)
        pos, side = 0, {}
        c = torch.zeros(R, nb, self.block, dtype=torch.int32)
        for kind, arg in _LAYOUT[self.name]:
            if kind == "f16":
                side[arg] = b[..., pos : pos + 2].contiguous().view(F16).reshape(R, nb)
                pos += 2
            elif kind == "bits":
                emap, width, shift = arg
                n = emap.shape[0]
                c |= _unpack_bits(b[..., pos : pos + n], emap, width, self.block) << shift
                pos += n
            elif kind == "int8":
                c = b[..., pos : pos + self.block].contiguous().view(torch.int8).to(torch.int32) + 128
                pos += self.block
            else:
                n = _SCALE_BYTES[self.name]
                side |= _unpack_scales(self, b[..., pos : pos + n])
                pos += n
        return c.reshape(R, nb * self.block).to(torch.uint8), side

    def half_offsets(self) -> dict[str, int]:
        """Byte offset inside a block of each fp16 field (d, and m or dmin where the type has them)."""
        out, pos = {}, 0
        for kind, arg in _LAYOUT[self.name]:
            if kind == "f16":
                out[arg] = pos
            sizes = {"f16": 2, "int8": self.block, "scales": _SCALE_BYTES.get(self.name, 0)}
            pos += arg[0].shape[0] if kind == "bits" else sizes[kind]
        assert pos == self.type_size, (self.name, pos)
        return out

    def half_fields(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        """The fp16 fields of every block -> fp16 [R, nb] each, read without unpacking the codes (the value checks
        of llmq/verify.py need only these)."""
        b = raw.reshape(raw.shape[0], -1, self.type_size)
        return {k: b[..., p : p + 2].contiguous().view(F16).squeeze(-1) for k, p in self.half_offsets().items()}

    def dequantize(self, raw: torch.Tensor) -> torch.Tensor:
        """uint8 blocks [R, nb*type_size] -> W [R, C] fp32, as gguf.quants.dequantize computes it."""
        codes, S, O = self.unpack(raw)
        C = codes.shape[1]
        S = S.repeat_interleave(self.group, dim=1)[:, :C]
        O = None if O is None else O.repeat_interleave(self.group, dim=1)[:, :C]
        return self.decode(codes, S, O)


def _f16_away_from_zero(x: torch.Tensor) -> torch.Tensor:
    """fp16 of x, its magnitude rounded up (never down): a group's range stays on the grid."""
    h = x.to(F16)
    short = h.float().abs() < x.abs()
    return torch.where(short, torch.nextafter(h, torch.where(x < 0, -torch.inf, torch.inf).to(F16)), h)


def _f16_down(x: torch.Tensor) -> torch.Tensor:
    h = x.to(F16)
    return torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, -torch.inf)), h)


def _codes(x: torch.Tensor, d: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Scale codes of x [R, nb, k] under d [R, nb] (fp16), nearest, clamped; 0 where d is 0."""
    df = d.float().unsqueeze(-1)
    q = torch.where(df != 0, torch.round(x / torch.where(df != 0, df, 1.0)), 0.0)
    return q.clamp(lo, hi).to(torch.int32)


# ---- bit fields: emap[byte, slot] = the element of the block whose bits go to that byte at slot*width ---------------
def _emap(nbytes: int, nslots: int, elem) -> torch.Tensor:
    return torch.tensor([[elem(b, s) for s in range(nslots)] for b in range(nbytes)], dtype=torch.long)


def _pack_bits(c: torch.Tensor, emap: torch.Tensor, width: int, shift: int) -> torch.Tensor:
    v = (c[..., emap] >> shift) & ((1 << width) - 1)  # [R, nb, nbytes, nslots]
    shifts = torch.arange(emap.shape[1], dtype=torch.int32) * width
    return (v << shifts).sum(-1).to(torch.uint8)


def _unpack_bits(b: torch.Tensor, emap: torch.Tensor, width: int, n: int) -> torch.Tensor:
    shifts = torch.arange(emap.shape[1], dtype=torch.int32) * width
    v = (b.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << width) - 1)
    out = torch.zeros(*b.shape[:-1], n, dtype=torch.int32)
    out[..., emap.reshape(-1)] = v.reshape(*b.shape[:-1], -1)
    return out


_NIB32 = _emap(16, 2, lambda b, s: s * 16 + b)  # Q4_0..Q5_1: byte j holds weights j and j+16
_BIT32 = _emap(4, 8, lambda b, s: 8 * b + s)  # Q5_0/Q5_1: 5th bits, a little-endian uint32
_NIB256 = _emap(128, 2, lambda b, s: (b // 32) * 64 + s * 32 + b % 32)  # Q4_K/Q5_K
_BIT256 = _emap(32, 8, lambda b, s: s * 32 + b)  # Q5_K 5th bits, Q3_K 3rd bits
_CRUMB256 = _emap(64, 4, lambda b, s: (b // 32) * 128 + s * 32 + b % 32)  # Q2_K/Q3_K 2-bit fields
_Q6_LO = _emap(128, 2, lambda b, s: (b // 64) * 128 + s * 64 + b % 64)
_Q6_HI = _emap(64, 4, lambda b, s: (b // 32) * 128 + s * 32 + b % 32)

_LAYOUT = {
    "q4_0": [("f16", "d"), ("bits", (_NIB32, 4, 0))],
    "q4_1": [("f16", "d"), ("f16", "m"), ("bits", (_NIB32, 4, 0))],
    "q5_0": [("f16", "d"), ("bits", (_BIT32, 1, 4)), ("bits", (_NIB32, 4, 0))],
    "q5_1": [("f16", "d"), ("f16", "m"), ("bits", (_BIT32, 1, 4)), ("bits", (_NIB32, 4, 0))],
    "q8_0": [("f16", "d"), ("int8", None)],
    "q2_k": [("scales", None), ("bits", (_CRUMB256, 2, 0)), ("f16", "d"), ("f16", "dmin")],
    "q3_k": [("bits", (_BIT256, 1, 2)), ("bits", (_CRUMB256, 2, 0)), ("scales", None), ("f16", "d")],
    "q4_k": [("f16", "d"), ("f16", "dmin"), ("scales", None), ("bits", (_NIB256, 4, 0))],
    "q5_k": [("f16", "d"), ("f16", "dmin"), ("scales", None), ("bits", (_BIT256, 1, 4)), ("bits", (_NIB256, 4, 0))],
    "q6_k": [("bits", (_Q6_LO, 4, 0)), ("bits", (_Q6_HI, 2, 4)), ("scales", None), ("f16", "d")],
}
_SCALE_BYTES = {"q2_k": 16, "q3_k": 12, "q4_k": 12, "q5_k": 12, "q6_k": 16}


def _pack_scales(bt: BlockType, side: dict, R: int, nb: int) -> torch.Tensor:
    sc = side["sc"].to(torch.int32).reshape(R, nb, -1)
    if bt.name == "q6_k":
        return sc.to(torch.int8).view(torch.uint8)
    if bt.name == "q2_k":
        return (sc | (side["m"].to(torch.int32).reshape(R, nb, -1) << 4)).to(torch.uint8)
    if bt.name == "q3_k":
        u = sc + 32
        lo = (u[..., :8] & 0xF) | ((u[..., 8:] & 0xF) << 4)
        hi = sum(((u[..., 4 * s : 4 * s + 4] >> 4) & 3) << (2 * s) for s in range(4))
        return torch.cat([lo, hi], -1).to(torch.uint8)
    m = side["m"].to(torch.int32).reshape(R, nb, -1)  # Q4_K / Q5_K: 8 scales and 8 mins of 6 bits in 12 bytes
    a = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    b = (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6)
    c = (sc[..., 4:] & 0xF) | ((m[..., 4:] & 0xF) << 4)
    return torch.cat([a, b, c], -1).to(torch.uint8)


def _unpack_scales(bt: BlockType, b: torch.Tensor) -> dict[str, torch.Tensor]:
    if bt.name == "q6_k":
        return {"sc": b.contiguous().view(torch.int8).to(torch.int32)}
    b = b.to(torch.int32)
    if bt.name == "q2_k":
        return {"sc": b & 0xF, "m": b >> 4}
    if bt.name == "q3_k":
        lo = torch.cat([b[..., :8] & 0xF, b[..., :8] >> 4], -1)
        hi = torch.cat([(b[..., 8:12] >> (2 * s)) & 3 for s in range(4)], -1)
        return {"sc": (lo | (hi << 4)) - 32}
    d_, m_, md = b[..., 0:4], b[..., 4:8], b[..., 8:12]
    sc = torch.cat([d_ & 63, (md & 0xF) | ((d_ >> 2) & 0x30)], -1)
    m = torch.cat([m_ & 63, (md >> 4) | ((m_ >> 2) & 0x30)], -1)
    return {"sc": sc, "m": m}


TYPES: dict[str, BlockType] = {t.name: t for t in (
    BlockType("q4_0", QT.Q4_0, 4, 32, 32, 18, 8, False),
    BlockType("q4_1", QT.Q4_1, 4, 32, 32, 20, 0, True),
    BlockType("q5_0", QT.Q5_0, 5, 32, 32, 22, 16, False),
    BlockType("q5_1", QT.Q5_1, 5, 32, 32, 24, 0, True),
    BlockType("q8_0", QT.Q8_0, 8, 32, 32, 34, 128, False, absmax_div=127),
    BlockType("q2_k", QT.Q2_K, 2, 256, 16, 84, 0, True, sc_bits=4, clamp_min=True),
    BlockType("q3_k", QT.Q3_K, 3, 256, 16, 110, 4, False, sc_bits=6),
    BlockType("q4_k", QT.Q4_K, 4, 256, 32, 144, 0, True, sc_bits=6, clamp_min=True),
    BlockType("q5_k", QT.Q5_K, 5, 256, 32, 176, 0, True, sc_bits=6, clamp_min=True),
    BlockType("q6_k", QT.Q6_K, 6, 256, 16, 210, 32, False, sc_bits=8),
)}  # fmt: skip

# llama.cpp's fallback when a tensor's row (in_features) is no multiple of the block (llama-quant.cpp,
# tensor_type_fallback): the 256-column K-quants fall back to a 32-column type, a 32-column type to F16.
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def fits(name: str, in_features: int) -> bool:
    return in_features % TYPES[name].block == 0


def fallback(name: str, in_features: int) -> str | None:
    """The type llama.cpp stores a tensor of this row length in when `name` is asked for; None: F16."""
    while name is not None and not fits(name, in_features):
        name = FALLBACK.get(name)
    return name

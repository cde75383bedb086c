"""Names that the plan, the passes, export and the runtimes share: branches and graph I/O.

docs/design.md ("Graph interface of a variant") fixes them: a variant graph reads `x`, `t`, the
model's conditioning (`y` for class-conditional DiTs) and one `cache.<block>.<branch>` per
cache it reuses; it writes `out` and the caches it refreshes. Dynamic-token branches carry
a second cache, their branch input, `cache.<block>.<branch>.in`. Forecast branches keep
their older history entries as `cache.<block>.<branch>.h<j>` (j >= 1; the newest is the
cache itself) and a forecasting variant reads its weights as `forecast.w`. Run constants,
which depend on the conditioning alone (a cross-attention branch's keys and values of the
text), are caches too: `cache.<block>.cross.k`, `cache.<block>.cross.v` ([B, L, D]), written
by a run's first step and read by the others. This module imports
nothing of tcgraph, so every layer may use it.
"""
from __future__ import annotations

BRANCHES = ("attn", "mlp")  # the branches of a DiT block, in the order recipes list them
# Every branch name a model adapter may use, in the one order that recipes list a block's
# branches and graph I/O lists caches: self-attention, cross-attention to the text, MLP. A
# model's branches are a subsequence (DiT: attn, mlp; PixArt's blocks: attn, cross, mlp; a
# two-stream block: attn over both streams, mlp of the image rows, mlp_text of the text rows;
# SD3.5's first blocks add attn_image, an attention over the image rows alone, after attn).
BRANCH_ORDER = ("attn", "attn_image", "cross", "mlp", "mlp_text")

# Streams: the hidden states a model's blocks update. Every model has the image stream (one row
# per image token, N rows); a two-stream model (MMDiT) also carries the text stream (one row per
# text token, L rows, L a plan setting). A branch reads and writes some of them; its cache holds
# their rows one after another, in the order its block kind lists them (docs/design.md, "Streams").
IMAGE, TEXT_STREAM = "image", "text"
STREAMS = (IMAGE, TEXT_STREAM)

CacheKey = tuple[int, str]  # (block, branch)

X, T, Y, OUT = "x", "t", "y", "out"
MODEL_INPUTS = (X, T, Y)  # the inputs of every variant graph of a class-conditional model, before its caches
# A text-conditioned model (PixArt) reads text embeddings [B, L, D_text] and their mask [B, L]
# (float32, 1 = a token, 0 = padding) in place of class ids; L is a plan setting.
TEXT, TEXT_MASK = "encoder_hidden_states", "encoder_attention_mask"
TEXT_INPUTS = (X, T, TEXT, TEXT_MASK)
# An MMDiT (FLUX, SD3) reads no mask: the text embeddings and pooled text embeddings [B, P] instead.
POOLED = "pooled_projections"
POOLED_INPUTS = (X, T, TEXT, POOLED)

# How guidance reaches a model (a family's and a plan's setting): "cfg" batches the unconditional
# half with the conditional one (the graphs see 2 x batch rows); "input" feeds the guidance scale
# as one more model input, `guidance` (float32 [B]: a guidance-distilled model, one pass per step);
# "none": the model takes no guidance.
GUIDANCE_MODES = ("cfg", "input", "none")
GUIDANCE = "guidance"

CACHE_PREFIX = "cache."
INPUT_SUFFIX = ".in"  # cache.<l>.<branch>.in: branch input of the cached rows (dynamic actions)
FORECAST_WEIGHTS = "forecast.w"  # float32 [sum of points]: one step's forecast weights, block order

# A gated step (docs/design.md, "Gated steps") carries its indicator state as graph I/O, kept by the
# runners between steps like a cache: the reference activation (the first blocks' output, [B, rows, D]),
# the accumulated change, the skips in a row (each float32 [1]), the computed steps of the run and the
# block work it did (float32 [2]: the sum of each step's share) and, per later branch, the steps whose
# outputs its history holds (float32 [keys, points], newest first; rows in `Recipe.gated_keys` order).
# It reads one plan input per step, `gate.params` (float32 [5]: step index, threshold, most skips in a
# row, the step's share of block work when it computes, when it skips).
GATE_PREFIX = "gate."
GATE_REF, GATE_ACC, GATE_SKIPS, GATE_COUNT, GATE_TIMES = (
    "gate.ref", "gate.acc", "gate.skips", "gate.count", "gate.times")
GATE_STATE = (GATE_REF, GATE_ACC, GATE_SKIPS, GATE_COUNT, GATE_TIMES)
GATE_PARAMS = "gate.params"

# Branches with run constants, and the constants' names: what a branch's function reads that
# depends on the conditioning alone, so a sampling run computes it once. A cross-attention
# branch's keys and values of the text, each [B, L, D] (before the split into heads).
RUN_CONSTANTS = {"cross": ("k", "v")}


def branch_key(key: tuple[int, str]) -> tuple[int, int]:
    """Sort key of a (block, branch) pair: by block, then branch in `BRANCH_ORDER`."""
    return key[0], BRANCH_ORDER.index(key[1])


def cache_name(block: int, branch: str) -> str:
    """Graph I/O name of a cache tensor, as docs/design.md fixes it."""
    return f"{CACHE_PREFIX}{block}.{branch}"


def input_cache_name(block: int, branch: str) -> str:
    """Graph I/O name of a branch-input cache (`cache.3.attn.in`), read and written by dynamic actions."""
    return cache_name(block, branch) + INPUT_SUFFIX


def constant_name(block: int, branch: str, what: str) -> str:
    """Graph I/O name of one run constant of a branch (`cache.3.cross.k`)."""
    return f"{cache_name(block, branch)}.{what}"


def is_constant(name: str) -> bool:
    """Whether a cache name is a run constant (`cache.<l>.<branch>.<what>`, `what` of RUN_CONSTANTS)."""
    parts = name.split(".")
    return (len(parts) == 4 and parts[0] + "." == CACHE_PREFIX and parts[1].isdigit()
            and parts[3] in RUN_CONSTANTS.get(parts[2], ()))


def history_name(block: int, branch: str, j: int) -> str:
    """Graph I/O name of history entry j of a branch (0 = newest = the cache itself, `cache.3.attn.h1` = the one before)."""
    return cache_name(block, branch) if j == 0 else f"{cache_name(block, branch)}.h{j}"


def history_index(name: str) -> tuple[str, int]:
    """(cache name, j) of a history entry name; (name, 0) for any other name."""
    base, _, last = name.rpartition(".h")
    if base and last.isdigit() and is_cache(base):
        return base, int(last)
    return name, 0


def cache_key(name: str) -> CacheKey:
    """(block, branch) of a branch cache name and of its history entries and input cache
    (`cache.3.attn`, `cache.3.attn.h1`, `cache.3.attn.in`)."""
    parts = name.split(".")
    if len(parts) < 3 or parts[0] + "." != CACHE_PREFIX or not parts[1].isdigit() or parts[2] not in BRANCH_ORDER:
        raise ValueError(f"not a branch cache name: {name!r}")
    return int(parts[1]), parts[2]


def is_cache(name: str) -> bool:
    return name.startswith(CACHE_PREFIX)


def is_gate(name: str) -> bool:
    """Whether a graph input or output is a gated step's state or its per-step parameters (`gate.*`)."""
    return name.startswith(GATE_PREFIX)


def is_model_input(name: str) -> bool:
    """Whether a graph input is one of the model's own (x, t, its conditioning), not a cache or a plan input."""
    return not is_cache(name) and name != FORECAST_WEIGHTS and not is_gate(name)


def model_input_count(inputs) -> int:
    """How many of a variant's inputs are the model's own: they come first (docs/design.md)."""
    count = 0
    while count < len(inputs) and is_model_input(inputs[count]):
        count += 1
    return count

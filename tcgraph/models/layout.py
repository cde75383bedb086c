"""A plan's layout: each block's branches and the streams each branch writes, so that the plan
knows every cache's rows without the model (docs/design.md, "Streams and per-block layouts").

A DiT's or PixArt's layout is the default: every block has the same branches and each writes
the image stream (N rows). It is not stored in plan JSON, so plans written before layouts
existed read unchanged and hash the same. A two-stream model's is stored compactly, as runs of
equal blocks: `[{"blocks": 2, "branches": {"attn": ["text", "image"], "mlp": ["image"],
"mlp_text": ["text"]}}, {"blocks": 1, "branches": {...}}]`.
"""
from __future__ import annotations

from dataclasses import dataclass

from tcgraph.errors import TcgraphError
from tcgraph.names import BRANCH_ORDER, IMAGE, STREAMS

BlockLayout = tuple[tuple[str, tuple[str, ...]], ...]  # (branch, streams in row order) of each branch


@dataclass(frozen=True)
class Layout:
    blocks: tuple[BlockLayout, ...]

    def __post_init__(self) -> None:
        try:
            blocks = tuple(tuple((str(name), tuple(streams)) for name, streams in block) for block in self.blocks)
        except (TypeError, ValueError):
            raise TcgraphError("a layout gives, per block, (branch, streams) pairs") from None
        object.__setattr__(self, "blocks", blocks)
        for l, block in enumerate(blocks):
            names = tuple(name for name, _ in block)
            if not names or names != tuple(b for b in BRANCH_ORDER if b in names):
                raise TcgraphError(f"layout block {l}: branches {list(names)} must be distinct names of "
                                   f"{list(BRANCH_ORDER)}, in that order")
            for name, streams in block:
                if not streams or len(set(streams)) != len(streams) or not set(streams) <= set(STREAMS):
                    raise TcgraphError(f"layout block {l} {name}: streams {list(streams)}; some of {list(STREAMS)}, "
                                       "each once")

    @classmethod
    def image(cls, branches) -> "Layout":
        """The default layout of `Recipe.branches` (one tuple per block): every branch writes the image rows."""
        return cls(tuple(tuple((name, (IMAGE,)) for name in names) for names in branches))

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def is_default(self) -> bool:
        """Every block has the same branches, each writing the image stream alone (nothing to store)."""
        return len(set(self.blocks)) == 1 and all(streams == (IMAGE,) for _, streams in self.blocks[0])

    def branches(self) -> tuple:
        """`Recipe.branches` of this layout: one tuple per block (the recipe stores equal ones once)."""
        return tuple(tuple(name for name, _ in block) for block in self.blocks)

    def streams(self, block: int, branch: str) -> tuple[str, ...]:
        for name, streams in self.blocks[block]:
            if name == branch:
                return streams
        raise TcgraphError(f"layout block {block} has no branch {branch!r}")

    def rows(self, block: int, branch: str, stream_rows: dict[str, int]) -> int:
        """Rows of the branch's cache: the rows of its streams, one after another."""
        return sum(stream_rows[s] for s in self.streams(block, branch))

    def image_slice(self, block: int, branch: str, stream_rows: dict[str, int]) -> slice | None:
        """Where the image rows lie among the branch's rows (None: it writes no image row)."""
        start = 0
        for stream in self.streams(block, branch):
            if stream == IMAGE:
                return slice(start, start + stream_rows[IMAGE])
            start += stream_rows[stream]
        return None

    def to_json(self) -> list:
        runs: list = []
        for block in self.blocks:
            entry = {name: list(streams) for name, streams in block}
            if runs and runs[-1]["branches"] == entry:
                runs[-1]["blocks"] += 1
            else:
                runs.append({"blocks": 1, "branches": entry})
        return runs

    @classmethod
    def from_json(cls, obj) -> "Layout":
        if not isinstance(obj, list) or not all(isinstance(r, dict) and isinstance(r.get("blocks"), int)
                                                and r["blocks"] >= 1 and isinstance(r.get("branches"), dict)
                                                for r in obj):
            raise TcgraphError('malformed plan: layout must be a list of {"blocks": count, "branches": '
                               '{branch: [streams]}}')
        return cls(tuple(tuple((name, tuple(streams)) for name, streams in run["branches"].items())
                         for run in obj for _ in range(run["blocks"])))

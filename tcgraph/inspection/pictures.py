"""Pictures of a plan, Pillow only: the schedule heatmap (steps x (block, branch), one
column per branch of the plan's model (DiT's attn, mlp; PixArt's attn, cross, mlp; a model whose
blocks differ: every branch any block has, blank where a block has none), coloured by action; forecasts in a purple ramp by their history points), kept-token masks
on the patch grid for token plans, and a block-level drawing of one variant as Graphviz DOT
text (rendered where `dot` is installed).

Layouts are exposed (`HeatmapLayout.cell_box`, `MaskLayout.token_box`) so that tests and
other tools can find the pixel of a given (step, block, branch[, token]).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tcgraph.errors import TcgraphError
from tcgraph.files import atomic_write, atomic_write_text, ensure_folder
from tcgraph.inspection.colors import (  # noqa: F401  (re-exported)
    BACKGROUND_RGB, CHOOSE, COMPUTE_RGB, FORECAST_DARK_RGB, FORECAST_LIGHT_RGB, KEPT_RGB, PARTIAL_DARK_RGB,
    PARTIAL_LIGHT_RGB, REUSE_RGB, REUSED_RGB, TEXT_RGB, action_color)
from tcgraph.inspection.dot import render_dot, variant_dot  # noqa: F401  (re-exported)
from tcgraph.plan.plan import Action, Plan
from tcgraph.names import BRANCH_ORDER

def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _save_png(img, path: Path) -> Path:
    return atomic_write(path, lambda f: img.save(f, format="PNG"), choose=CHOOSE)


#################################################################################
#                                  Heatmap                                      #
#################################################################################


@dataclass(frozen=True)
class HeatmapLayout:
    """Where each (step, block, branch) cell is: rows are steps, columns (block, branch), one per
    branch of `branches` (the plan's) in each block."""

    num_steps: int
    depth: int
    branches: tuple[str, ...]  # a column per branch any block has (`plan_columns`)
    cell_w: int = 8
    cell_h: int = 8
    block_gap: int = 2  # white gap between blocks
    left: int = 36  # step labels
    top: int = 22  # block labels

    def cell_box(self, step: int, block: int, branch: str) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), x1/y1 exclusive."""
        col = len(self.branches) * block + _branch_index(self.branches, branch)
        x0 = self.left + col * self.cell_w + block * self.block_gap
        y0 = self.top + step * self.cell_h
        return x0, y0, x0 + self.cell_w, y0 + self.cell_h

    def cell_center(self, step: int, block: int, branch: str) -> tuple[int, int]:
        x0, y0, x1, y1 = self.cell_box(step, block, branch)
        return (x0 + x1) // 2, (y0 + y1) // 2

    @property
    def grid_width(self) -> int:
        return self.left + len(self.branches) * self.depth * self.cell_w + (self.depth - 1) * self.block_gap

    @property
    def grid_height(self) -> int:
        return self.top + self.num_steps * self.cell_h

    def legend_swatch_box(self, i: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of legend entry i's colour swatch (outline included), x1/y1 exclusive."""
        lx, ly = self.grid_width + 12, self.top + 16 * i
        return lx, ly, lx + 11, ly + 11

    def legend_swatch_center(self, i: int) -> tuple[int, int]:
        x0, y0, x1, y1 = self.legend_swatch_box(i)
        return (x0 + x1) // 2, (y0 + y1) // 2


def _branch_index(branches: tuple[str, ...], branch: str) -> int:
    if branch not in branches:
        raise TcgraphError(f"no branch {branch!r} in this plan's blocks; its branches are {', '.join(branches)}")
    return branches.index(branch)


def plan_columns(plan: Plan) -> tuple[str, ...]:
    """One column per branch any block has, in recipe order (a block without one leaves it blank)."""
    return tuple(b for b in BRANCH_ORDER if any(b in block for block in plan.block_layout().branches()))


def heatmap_layout(plan: Plan) -> HeatmapLayout:
    return HeatmapLayout(plan.settings.num_steps, plan.depth, branches=plan_columns(plan))


def legend_entries(plan: Plan) -> list[tuple[tuple[int, int, int], str]]:
    """(colour, text) of the heatmap legend, top to bottom: compute, reuse, the partial and
    dynamic shades the plan uses (a sample partial shade where it has neither), and one entry
    per forecast point count the plan uses (F2, F3: the purple darkens with the points)."""
    entries = [(COMPUTE_RGB, "compute"), (REUSE_RGB, "reuse")]
    n = plan.num_tokens
    ks = sorted({a.k for r in plan.recipes for _, _, a in r.items() if a.kind == "partial"})
    dks = sorted({a.k for r in plan.recipes for _, _, a in r.items() if a.kind == "dynamic"})
    if ks:
        for k in (ks[0], ks[-1]) if len(ks) > 1 else (ks[0],):
            entries.append((action_color(Action("partial", tuple(range(k))), n), f"partial k={k}/{n}"))
    points = sorted({a.points for r in plan.recipes for _, _, a in r.items() if a.kind == "forecast"})
    if not ks and not dks and not points:
        entries.append((action_color(Action("partial", tuple(range(max(n // 4, 1)))), n), "partial (shade: k/N)"))
    for k in (dks[0], dks[-1]) if len(dks) > 1 else dks:
        entries.append((action_color(Action("dynamic", size=k), n), f"dynamic k={k}/{n}"))
    for p in points:
        entries.append((action_color(Action("forecast", points=p), n),
                        f"forecast F{p} ({p} point{'s' if p > 1 else ''})"))
    return entries


def draw_heatmap(plan: Plan, path: str | Path) -> Path:
    """Schedule heatmap PNG: one row per step, one column per (block, branch), and a legend."""
    from PIL import Image, ImageDraw

    lay = heatmap_layout(plan)
    font = _font()
    legend_w = 190
    width = lay.grid_width + 12 + legend_w
    height = max(lay.grid_height + 8, lay.top + 120, lay.top + 16 * len(legend_entries(plan)) + 44)
    img = Image.new("RGB", (width, height), BACKGROUND_RGB)
    d = ImageDraw.Draw(img)
    for step, recipe in enumerate(plan.recipes):
        for block, branch, action in recipe.items():
            x0, y0, x1, y1 = lay.cell_box(step, block, branch)
            d.rectangle([x0, y0, x1 - 1, y1 - 1], fill=action_color(action, plan.num_tokens))
    label_every = max(1, -(-10 // lay.cell_h))  # a step label every ~10 px
    for step in range(0, lay.num_steps, label_every):
        d.text((2, lay.top + step * lay.cell_h - 2), str(step), fill=TEXT_RGB, font=font)
    block_every = max(1, -(-18 // (len(lay.branches) * lay.cell_w + lay.block_gap)))
    for block in range(0, lay.depth, block_every):
        x0, _, _, _ = lay.cell_box(0, block, lay.branches[0])
        d.text((x0, 2), str(block), fill=TEXT_RGB, font=font)
    d.text((2, 2), "step", fill=TEXT_RGB, font=font)
    # Legend.
    entries = legend_entries(plan)
    lx, ly = lay.grid_width + 12, lay.top
    for color, text in entries:
        d.rectangle([lx, ly, lx + 10, ly + 10], fill=color, outline=TEXT_RGB)
        d.text((lx + 16, ly - 1), text, fill=TEXT_RGB, font=font)
        ly += 16
    d.text((lx, ly + 4), f"columns: block {'|'.join(lay.branches)}", fill=TEXT_RGB, font=font)
    d.text((lx, ly + 20), f"{plan.planner}", fill=TEXT_RGB, font=font)
    return _save_png(img, Path(path))


#################################################################################
#                                Token masks                                    #
#################################################################################


@dataclass(frozen=True)
class MaskLayout:
    """A grid of masks: one row per step with a partial action, one column per (block, branch)
    (the plan's `branches` in each block); each cell is the patch grid (`side` x `side` tokens,
    `px` pixels each)."""

    steps: tuple[int, ...]
    depth: int
    side: int
    branches: tuple[str, ...]  # a column per branch any block has (`plan_columns`)
    px: int = 3
    gap: int = 3
    left: int = 30
    top: int = 18

    @property
    def cell(self) -> int:
        return self.side * self.px

    def cell_origin(self, step: int, block: int, branch: str) -> tuple[int, int]:
        if step not in self.steps:
            raise TcgraphError(f"step {step} has no partial action; the mask grid shows steps {list(self.steps)}")
        row = self.steps.index(step)
        col = len(self.branches) * block + _branch_index(self.branches, branch)
        return self.left + col * (self.cell + self.gap) + block * self.gap, self.top + row * (self.cell + self.gap)

    def token_box(self, step: int, block: int, branch: str, token: int) -> tuple[int, int, int, int]:
        x, y = self.cell_origin(step, block, branch)
        r, c = divmod(token, self.side)
        return x + c * self.px, y + r * self.px, x + (c + 1) * self.px, y + (r + 1) * self.px

    def token_center(self, step: int, block: int, branch: str, token: int) -> tuple[int, int]:
        x0, y0, x1, y1 = self.token_box(step, block, branch, token)
        return (x0 + x1) // 2, (y0 + y1) // 2

    @property
    def width(self) -> int:
        return self.left + len(self.branches) * self.depth * (self.cell + self.gap) + self.depth * self.gap

    @property
    def height(self) -> int:
        return self.top + len(self.steps) * (self.cell + self.gap)


def partial_steps(plan: Plan) -> list[int]:
    return [s for s, r in enumerate(plan.recipes) if any(a.kind == "partial" for _, _, a in r.items())]


def mask_layout(plan: Plan) -> MaskLayout | None:
    """None where the plan has no partial action."""
    steps = partial_steps(plan)
    if not steps:
        return None
    side = round(plan.num_tokens ** 0.5)
    if side * side != plan.num_tokens:
        raise TcgraphError(f"{plan.num_tokens} tokens do not form a square patch grid; cannot draw token masks")
    px = max(1, min(4, 48 // side))
    return MaskLayout(tuple(steps), plan.depth, side, px=px, branches=plan_columns(plan))


def draw_token_masks(plan: Plan, path: str | Path) -> Path | None:
    """Kept-token masks per (step, block, branch) on the patch grid; None if the plan has no partial."""
    from PIL import Image, ImageDraw

    lay = mask_layout(plan)
    if lay is None:
        return None
    font = _font()
    img = Image.new("RGB", (max(lay.width, 390), lay.height + 18), BACKGROUND_RGB)
    d = ImageDraw.Draw(img)
    for step in lay.steps:
        recipe = plan.recipes[step]
        y = lay.cell_origin(step, 0, lay.branches[0])[1]
        d.text((2, y), str(step), fill=TEXT_RGB, font=font)
        for block, branch, action in recipe.items():
            x0, y0 = lay.cell_origin(step, block, branch)
            if action.kind == "partial":
                d.rectangle([x0, y0, x0 + lay.cell - 1, y0 + lay.cell - 1], fill=REUSED_RGB)
                for t in action.indices:
                    bx0, by0, bx1, by1 = lay.token_box(step, block, branch, t)
                    d.rectangle([bx0, by0, bx1 - 1, by1 - 1], fill=KEPT_RGB)
            else:  # dynamic: no fixed tokens, the cell takes the heatmap shade of k/N
                fill = {"compute": KEPT_RGB, "reuse": REUSED_RGB}.get(action.kind) or action_color(action, plan.num_tokens)
                d.rectangle([x0, y0, x0 + lay.cell - 1, y0 + lay.cell - 1], fill=fill)
    letters = "|".join(br[0] for br in lay.branches)  # a|m, a|c|m
    for block in range(plan.depth):
        x0, _ = lay.cell_origin(lay.steps[0], block, lay.branches[0])
        d.text((x0, 2), f"b{block}" if lay.cell < 24 else f"b{block} {letters}", fill=TEXT_RGB, font=font)
    d.text((2, lay.height + 2), "blue: recomputed token, grey: from cache; rows: steps with partial", fill=TEXT_RGB,
           font=font)
    return _save_png(img, Path(path))


def write_plan_pictures(plan: Plan, out_dir: str | Path, *, variant: str | None = None) -> list[Path]:
    """Heatmap, token masks (token plans), DOT of `variant` (every variant if None), rendered
    to SVG where `dot` exists. Returns the files written."""
    out = ensure_folder(Path(out_dir), CHOOSE)
    variants = plan.variants()
    ids = [f"v{i}" for i in range(len(variants))]
    if variant is not None and variant not in ids:
        raise TcgraphError(f"unknown variant {variant!r}; valid variants: {', '.join(ids)}")
    written = [draw_heatmap(plan, out / "schedule_heatmap.png")]
    masks = draw_token_masks(plan, out / "token_masks.png")
    if masks is not None:
        written.append(masks)
    for vid in [variant] if variant is not None else ids:
        dot = out / f"variant_{vid}.dot"
        atomic_write_text(dot, variant_dot(plan, variants[ids.index(vid)], vid), choose=CHOOSE)
        written.append(dot)
        rendered = render_dot(dot)
        if rendered is not None:
            written.append(rendered)
    return written


def write_pictures(path: str | Path, out_dir: str | Path, *, variant: str | None = None,
                   verify: bool = True) -> list[Path]:
    """Pictures of an artifact folder into `out_dir` (never into the artifact folder)."""
    from tcgraph.export.artifact import load_artifact

    art = load_artifact(Path(path), verify_hashes=verify)
    out = Path(out_dir).absolute()
    root = art.root.resolve()
    if out.resolve() == root or root in out.resolve().parents:
        raise TcgraphError(f"{out} lies inside the artifact folder {art.root}; inspect never writes there: "
                           "choose another --out folder")
    return write_plan_pictures(art.plan, out, variant=variant)

"""The colours of each action in the pictures of a plan (heatmap, token masks, DOT drawing)."""
from __future__ import annotations

from tcgraph.plan.plan import MAX_HISTORY, Action

COMPUTE_RGB = (33, 102, 172)  # blue
REUSE_RGB = (222, 222, 222)  # light grey
PARTIAL_LIGHT_RGB = (254, 224, 182)  # partial with few tokens recomputed ...
PARTIAL_DARK_RGB = (179, 88, 6)  # ... to nearly all (orange ramp by k / N)
FORECAST_LIGHT_RGB = (203, 170, 222)  # forecast from 1 history point ...
FORECAST_DARK_RGB = (84, 39, 143)  # ... to MAX_HISTORY points (purple ramp by points)
BACKGROUND_RGB = (255, 255, 255)
TEXT_RGB = (0, 0, 0)
KEPT_RGB = COMPUTE_RGB  # token masks: recomputed token
REUSED_RGB = REUSE_RGB  # token masks: token taken from the cache
CHOOSE = "choose another --out folder"


def action_color(action: Action, num_tokens: int) -> tuple[int, int, int]:
    """Heatmap colour of one action; partial and dynamic shade from light (k small) to dark (k = N),
    forecast from light (1 history point) to dark (MAX_HISTORY points)."""
    if action.kind == "compute":
        return COMPUTE_RGB
    if action.kind == "reuse":
        return REUSE_RGB
    if action.kind == "forecast":
        f = (action.points - 1) / max(MAX_HISTORY - 1, 1)
        return tuple(round(lo + (hi - lo) * f) for lo, hi in zip(FORECAST_LIGHT_RGB, FORECAST_DARK_RGB))
    f = (action.k or 0) / max(num_tokens, 1)
    return tuple(round(lo + (hi - lo) * f) for lo, hi in zip(PARTIAL_LIGHT_RGB, PARTIAL_DARK_RGB))

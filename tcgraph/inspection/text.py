"""Text report of `inspect_artifact`'s dict, sized for a terminal: summary and variant table
by default; a focused variant or step adds its block view and diff, and (for a variant) a
node table cut at NODE_TABLE_LINES rows.
"""
from __future__ import annotations

from tcgraph.errors import TcgraphError
from tcgraph.inspection.graph import UNIT_WORD
from tcgraph.inspection.measured import measured_line
from tcgraph.names import BRANCH_ORDER

NODE_TABLE_LINES = 40  # node rows printed for a focused variant; the rest is counted
FORECAST_LINES = 12  # forecast branches printed one per line for a step; beyond, equal weights share a line


#################################################################################
#                                   Text                                        #
#################################################################################


def _gflop(x) -> str:
    return "-" if x is None else f"{x / 1e9:.3f}"


def _human_flops(x: int) -> str:
    for unit, div in (("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x} FLOP"


def format_report(info: dict, *, variant: str | None = None, step: int | None = None) -> str:
    """Readable report of `inspect_artifact`'s dict: summary and variant table; with a focus
    (`variant`/`step` here or already in `info`), the block view, diff and node table."""
    s = info["settings"]
    lines = []
    if "path" in info:
        lines.append(f"artifact   {info['path']}")
    m = info.get("model")
    if m:
        conditioning = (f"text {s['text_length']} tokens x {m['caption_channels']}" if m.get("caption_channels")
                        else f"{m['num_classes']} classes")
        lines.append(f"model      {m.get('source') or 'model'}: depth {m['depth']}, hidden {m['hidden_size']}, "
                     f"heads {m['num_heads']}, {info['num_tokens']} tokens, {conditioning}")
    sampler = f"diffusers {s['scheduler']}" if s.get("scheduler") else s["sampler"]
    layout = f" ({m['layout']} layout)" if m and m.get("layout") else ""
    if layout:
        lines[-1] += layout
    lines.append(f"sampler    {sampler} {s['num_steps']} steps, guidance {s['cfg_scale']}, eta {s['eta']}, "
                 f"batch {s['batch']} (model batch {s['model_batch']}), resolution {s['resolution']}")
    plan_line = f"plan       {info['planner']}: {len(info['variants'])} variants"
    if info.get("predicted_speedup") is not None:
        plan_line += (f", predicted speedup {info['predicted_speedup']:.2f}x "
                      f"({info['flops_per_run'] / 1e9:.2f} of {info['full_flops_per_run'] / 1e9:.2f} GFLOP per run)")
    lines.append(plan_line)
    g = info.get("gate")
    if g:
        cheap = "reuse" if g["order"] == 0 else f"forecast from {g['order'] + 1} points"
        calibrated = "" if g["calibrated_fraction"] is None else f", {g['calibrated_fraction']:.3f} as calibrated"
        over = f", else run their recipe of the base plan {g['base']}" if g.get("base") else ""
        lines.append(f"gate       the first {g['first']} blocks always compute; the others {cheap} while the "
                     f"{g['indicator']} indicator < {', '.join(f'{t:.4g}' for t in g['thresholds']) or '-'} (at most "
                     f"{g['max_skips']} skips in a row; {len(g['forced_steps'])} steps always compute){over}; compute "
                     f"fraction {g['fraction_range'][0]:.3f} … {g['fraction_range'][1]:.3f}{calibrated}, decided "
                     "on the device per batch (`sample` reports a run's)")
    learned = _learned_line(info.get("params") or {})
    if learned:
        lines.append(learned)
    if "path" in info:  # an artifact (not a bare plan): what `compare` last measured of it
        lines.append(measured_line(info.get("measured")))
    c = info["action_counts"]
    dyn = f", dynamic {c['dynamic']}" if c.get("dynamic") else ""
    fc = info.get("forecast_counts") or {}
    if c.get("forecast"):
        dyn += f", forecast {c['forecast']}" + (f" ({', '.join(f'{k} {n}' for k, n in fc.items())})" if fc else "")
    lines.append(f"actions    compute {c['compute']}, reuse {c['reuse']}, partial {c['partial']}{dyn} "
                 f"(steps x blocks x branches = {sum(c.values())})")
    if c.get("forecast") and info.get("memory"):
        lines += _memory_lines(info["memory"], s["model_batch"])
    lines += _constants_line(info.get("memory"))
    if "weights" in info:
        n_onnx = sum(v.get("onnx_bytes") or 0 for v in info["variants"])
        lines.append(f"weights    {info['weights']['bytes'] / 2**20:.1f} MiB on disk in {info['weights']['file']} "
                     f"(one file for all variants; graphs {n_onnx / 2**20:.2f} MiB)")
    if "engines" in info:
        e = info["engines"]
        lines.append("engines    " + (f"{len(e['files'])} for {e['backend']}: {', '.join(e['files'][:6])}"
                                      + (" …" if len(e["files"]) > 6 else "")
                                      if e["files"] else "none (ONNX for the ort and torch backends)"))
        if e.get("problems"):
            lines.append("           NOT USABLE: " + "; ".join(e["problems"][:3])
                         + ("; …" if len(e["problems"]) > 3 else "")
                         + "; re-run `tcgraph transform --backend trt` to rebuild them")
        elif e.get("status") in ("listed", "unverified"):
            lines.append("           " + ("files as transform wrote them (sha256 checked)" if e["status"] == "listed"
                                          else "hashes not checked")
                         + "; only TensorRT can tell whether they load on this GPU (`tcgraph sample --backend trt`)")
        trt = e.get("settings") or {}
        if trt:
            device = trt.get("device") or {}
            lines.append(f"           TensorRT {trt.get('tensorrt_version')}, {trt.get('precision')}, built for "
                         f"{device.get('name')} (sm {device.get('compute_capability')})"
                         + (", weight-stripped (refitted from weights.bin on load)" if trt.get("weight_stripped")
                            else ""))
    lines.append(f"schedule   {info['schedule_compact']}")
    if not info["full_variant_exists"]:
        lines.append(f"full       no variant computes everything; diffs are against {info['full_variant']} "
                     "(the most FLOPs)")
    lines.append("")
    with_fc = any(v.get("forecast") for v in info["variants"])  # the column only where a plan forecasts
    lines.append(f"{'variant':<8}{'steps':>6}{'compute':>9}{'reuse':>7}{'partial':>9}"
                 + (f"{'forecast':>10}" if with_fc else "") + f"{'reads':>7}{'writes':>8}"
                 f"{'GFLOP':>9}{'of full':>9}  first steps")
    for v in info["variants"]:
        frac = "-" if v["fraction"] is None else f"{v['fraction']:.0%}"
        first = ",".join(str(x) for x in v["steps"][:6]) + ("…" if len(v["steps"]) > 6 else "")
        lines.append(f"{v['id']:<8}{len(v['steps']):>6}{v['compute']:>9}{v['reuse']:>7}{v['partial']:>9}"
                     + (f"{v.get('forecast', 0):>10}" if with_fc else "")
                     + f"{len(v['reads']):>7}{len(v['writes']):>8}{_gflop(v['flops']):>9}{frac:>9}  {first}")

    focus = info.get("focus")
    if focus is None and (variant is not None or step is not None):
        raise TcgraphError("this report has no focus data; call inspect_artifact(path, variant=..., step=...) "
                           "with the same variant/step")
    if focus is not None:
        lines += [""] + _format_focus(info, focus)
    return "\n".join(lines)


def _format_focus(info: dict, focus: dict) -> list[str]:
    vid = focus["variant"]
    v = next(x for x in info["variants"] if x["id"] == vid)
    lines = []
    pos = focus.get("step")
    if pos is not None:
        since = ("no full step before it" if pos["last_full_step"] is None
                 else f"{pos['steps_since_full']} after full step {pos['last_full_step']}")
        lines.append(f"step {pos['step']} of 0..{pos['num_steps'] - 1}: runs {vid} (occurrence {pos['occurrence']} of "
                     f"{pos['variant_steps']}), step {pos['position_in_run']} of a run of {pos['run_length']} "
                     f"(steps {pos['run'][0]}-{pos['run'][1]}), {since}")
    dyn = f", {v['dynamic']} dynamic" if v.get("dynamic") else ""
    dyn += f", {v['forecast']} forecast" if v.get("forecast") else ""
    extra = "".join(f" (+ {n})" for n in v.get("plan_inputs", []))
    lines.append(f"variant {vid}: {len(v['steps'])} steps, {v['compute']} compute, {v['reuse']} reuse, "
                 f"{v['partial']} partial{dyn}; reads {len(v['reads'])} caches{extra}, writes {len(v['writes'])}")
    lines.append("")
    columns = [br for br in BRANCH_ORDER if any(br in row for row in focus["blocks"])]  # a block without one: "-"
    lines.append(f"{'block':>5}  " + "".join(f"{br:<14}" for br in columns))
    for row in focus["blocks"]:
        lines.append(f"{row['block']:>5}  " + "".join(f"{row.get(br, '-'):<14}" for br in columns))
    if focus.get("forecast"):
        lines += _forecast_lines(focus["forecast"], vid)
    side = _grid_side(info["num_tokens"])
    for row in focus["blocks"]:
        for br in BRANCH_ORDER:
            tokens = row.get(f"{br}_tokens")
            if tokens is not None:
                lines.append(f"  block {row['block']} {br}: keeps tokens {_ranges(tokens)}")
                if side and len(focus["blocks"]) <= 8:  # masks only where they fit on a screen
                    lines += ["    " + r for r in _mask_text(tokens, side)]
    if "diff" not in focus:
        return lines
    d = focus["diff"]
    g = focus["graph"]
    lines.append("")
    head = f"graph {vid}: {g['num_nodes']} nodes, {_human_flops(g['flops'])} (matrix products and convolutions)"
    lines.append(head)
    if focus["diff_base"] == vid:
        lines.append(f"diff vs {vid} (itself, the full graph): nothing added or removed")
    else:
        base_note = "" if info["full_variant_exists"] else " (no full variant: the one with the most FLOPs)"
        lines.append(f"diff vs {focus['diff_base']}{base_note}: -{d['nodes_removed']} nodes "
                     f"(-{_human_flops(d['flops_removed'])}), +{d['nodes_added']} nodes "
                     f"(+{_human_flops(d['flops_added'])})")
        for label, key in (("cache reads (inputs added)", "inputs_added"), ("inputs removed", "inputs_removed"),
                           ("cache writes added", "outputs_added"), ("cache writes removed", "outputs_removed")):
            if d[key]:
                lines.append(f"  {label}: {_names(d[key])}")
        for sign, key in (("-", "removed_by_unit"), ("+", "added_by_unit")):
            shown = _group_units(d[key])
            for label, u, count in shown[:24]:
                ops = ", ".join(f"{op} {n}" for op, n in sorted(u["ops"].items(), key=lambda kv: -kv[1])[:5])
                each = " each" if count > 1 else ""
                lines.append(f"  {sign} {label:<22}{u['nodes']:>4} nodes{each} {_human_flops(u['flops']):>13}{each}"
                             f"  {ops}")
            if len(shown) > 24:
                lines.append(f"  … {len(shown) - 24} more groups (--json lists every node)")
    if pos is not None:  # a step focus stops at the diff; the node table is for --variant
        return lines
    lines.append("")
    lines.append(f"{'#':>4}  {'op':<20}{'unit':<18}{'scope':<28}{'FLOPs':>12}  onnx name")
    nodes = g["nodes"]
    for i, n in enumerate(nodes[:NODE_TABLE_LINES]):
        lines.append(f"{i:>4}  {n['op']:<20}{n['unit']:<18}{n['scope'][:27]:<28}{n['flops']:>12}  {n['name']}")
    if len(nodes) > NODE_TABLE_LINES:
        lines.append(f"   … {len(nodes) - NODE_TABLE_LINES} more nodes (--json lists them all)")
    return lines


def _memory_lines(m: dict, model_batch: int) -> list[str]:
    """Cache memory of a forecast plan: total, split into caches / history / input caches, history per branch."""
    shape = "[" + ", ".join("?" if d is None else str(d) for d in m["tensor_shape"]) + "]"

    def part(key: str, label: str) -> str:
        mb = "" if m[key]["bytes"] is None else f" ({m[key]['bytes'] / 2**20:.2f} MB)"
        return f"{label} {m[key]['count']}{mb}"

    total = ("hidden size unknown" if m["bytes"] is None
             else f"{m['mb']:.2f} MB ({m['bytes']} bytes) for model batch {model_batch}")
    lines = [f"cache mem  {total}, {m['tensors']} tensors of {shape} {m['dtype']}",
             f"           {part('caches', 'caches')}, {part('history', 'history entries')}, "
             f"{part('input_caches', 'input caches')}"]
    per = m.get("history_per_branch") or {}
    if per:
        by_n: dict[int, list[str]] = {}
        for name, n in per.items():
            by_n.setdefault(n, []).append(name)
        parts = [f"{n} on {len(names)} branch{'es' if len(names) > 1 else ''}"
                 + (f" ({_names(names, 3)})" if len(by_n) > 1 else "")
                 for n, names in sorted(by_n.items(), reverse=True)]
        lines.append("history    entries per forecast branch (its cache included): " + "; ".join(parts))
    return lines


def _constants_line(m: dict | None) -> list[str]:
    """The run constants a text-conditioned plan carries (the text's keys and values), if any."""
    c = (m or {}).get("constants") or {}
    if not c.get("count"):
        return []
    shape = "[" + ", ".join("?" if d is None else str(d) for d in c["tensor_shape"]) + "]"
    mb = "" if c["bytes"] is None else f" ({c['bytes'] / 2**20:.2f} MB)"
    return [f"constants  {c['count']} tensors of {shape}{mb}: the text's keys and values, written by step 0 "
            "and read by the later steps"]


def _forecast_lines(fc: dict, vid: str) -> list[str]:
    """A forecasting variant's weights: fed per step through forecast.w; with a step, its weights per branch."""
    kinds: dict[int, int] = {}
    for b in fc["branches"]:
        kinds[b["points"]] = kinds.get(b["points"], 0) + 1
    mix = ", ".join(f"F{p} x{n}" for p, n in sorted(kinds.items()))
    steps = ", ".join(str(x) for x in fc["steps"][:12]) + (" …" if len(fc["steps"]) > 12 else "")
    lines = ["",
             f"forecast   {len(fc['branches'])} branches ({mix}) read {fc['size']} history tensors; weights are per "
             "step, not graph constants:",
             f"           each step feeds its own through {fc['input']} ({fc['size']} floats: block order, "
             "newest history entry first)",
             f"           steps running {vid}: {steps} ({fc['distinct_weight_sets']} distinct weight "
             f"set{'s' if fc['distinct_weight_sets'] != 1 else ''})"]
    if "weights" not in fc:
        return lines
    lines.append(f"weights at step {fc['step']}:")
    rows = fc["weights"]
    if len(rows) <= FORECAST_LINES:
        for r in rows:
            lines.append(f"  {'block ' + str(r['block']) + ' ' + r['branch']:<14}{_forecast_line(r)}")
        return lines
    groups: dict[tuple, list[dict]] = {}
    for r in rows:  # equal weights on equal steps share a line (a Taylor plan: one line)
        groups.setdefault((r["points"], tuple(r["weights"]), tuple(r["history_steps"])), []).append(r)
    shown = list(groups.values())
    for g in shown[:FORECAST_LINES]:
        lines.append(f"  {_branch_set(g):<22}{_forecast_line(g[0])}")
    if len(shown) > FORECAST_LINES:
        lines.append(f"  … {len(shown) - FORECAST_LINES} more weight sets (--json lists every branch)")
    return lines


def _forecast_line(r: dict) -> str:
    w = ", ".join(f"{x:+.3f}" for x in r["weights"])
    return f"F{r['points']}  w = [{w}] on steps {list(r['history_steps'])}"


def _branch_set(rows: list[dict]) -> str:
    """`block 3 attn`, `blocks 0-27 attn+mlp`, or `attn blocks 0-3, mlp blocks 1,5`."""
    if len(rows) == 1:
        return f"block {rows[0]['block']} {rows[0]['branch']}"
    per = {br: [r["block"] for r in rows if r["branch"] == br] for br in BRANCH_ORDER}
    per = {br: b for br, b in per.items() if b}
    blocks = {tuple(b) for b in per.values()}
    if len(blocks) == 1:
        b = list(blocks.pop())
        return f"block{'s' if len(b) > 1 else ''} {_ranges(b).rsplit(' ', 1)[0]} {'+'.join(per)}"
    return ", ".join(f"{br} blocks {_ranges(b).rsplit(' ', 1)[0]}" for br, b in per.items())


def _group_units(units: dict) -> list[tuple[str, dict, int]]:
    """Blocks whose units changed alike share one line: `blocks 0-27 .attn` (28 blocks x 2
    branches would otherwise be 56 lines)."""
    groups: dict[tuple, list[tuple[int, str]]] = {}
    singles = []
    for unit, u in units.items():
        if u.get("block") is None:
            singles.append((unit, u, 1))
            continue
        suffix = f".{u['branch']}" if u.get("branch") else ""
        sig = (suffix, u["nodes"], u["flops"], tuple(sorted(u["ops"].items())))
        groups.setdefault(sig, []).append((u["block"], unit))
    result = []
    for sig, members in groups.items():
        first = members[0][1]
        label = first if len(members) == 1 else \
            f"{UNIT_WORD} {_ranges([b for b, _ in members]).rsplit(' ', 1)[0]} {sig[0]}"
        result.append((label, units[first], len(members)))
    return result + singles


def _names(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" … ({len(names) - limit} more)" if len(names) > limit else "")


def _ranges(indices: list[int]) -> str:
    """[0,1,2,5,7,8] -> '0-2,5,7-8' (k of them)."""
    parts, run = [], []
    for i in sorted(indices):
        if run and i == run[-1] + 1:
            run.append(i)
        else:
            if run:
                parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
            run = [i]
    if run:
        parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return f"{','.join(parts)} ({len(indices)})"


def _grid_side(num_tokens: int) -> int | None:
    side = round(num_tokens ** 0.5)
    return side if side * side == num_tokens else None


def _mask_text(tokens: list[int], side: int) -> list[str]:
    kept = set(tokens)
    return ["".join("#" if r * side + c in kept else "." for c in range(side)) for r in range(side)]


def _learned_line(p: dict) -> str | None:
    """One line on how a learned plan was made (l2c, tokencache, combined); None for fixed plans."""
    method = p.get("method")
    if method is None and p.get("source") == "published-router":
        return f"learned    imported L2C router {p.get('router')}, threshold {p.get('threshold')}"
    if method is None:
        return None
    err = p.get("held_out_error")
    tail = f", held-out eps MSE {err:.2e}" if isinstance(err, float) else ""
    if isinstance(p.get("held_out_psnr"), (int, float)):  # the chosen candidate's sampling runs against full
        floor = p.get("min_psnr")
        tail += f", held-out PSNR {p['held_out_psnr']:.1f} dB" + (f" (--min-psnr {floor})" if floor is not None else "")
    if method == "learning-to-cache":
        how = (f"target {p['target_speedup']}x" if p.get("target_speedup") else
               f"λ {p.get('lambda')}, threshold {p.get('threshold')}")
        return f"learned    L2C router: full step every {p.get('interval')} steps, {how}{tail}"
    if method == "tokencache":
        return (f"learned    TokenCache: TPRR b={p.get('b')}, K1={p.get('K1')}, K2={p.get('K2')}, "
                f"keep per block {p.get('keep_counts')}{tail}")
    if method == "tokencache+l2c":
        return (f"learned    L2C (share {p.get('l2c_share')}, full step every {p.get('l2c', {}).get('interval')}) "
                f"+ TokenCache keep per block {p.get('keep_counts')}{tail}")
    return f"learned    {method}{tail}"

"""`draftheads bench` and `draftheads calibrate`.

bench: on one prompt set, in one process, on one loaded backbone, time six ways of greedy decoding
(batch 1): transformers' `generate` (the baseline), our loop without heads, our loop with heads and
a tree (speculative), our loop with prompt lookup alone and with heads + lookup (hybrid), and
transformers' prompt-lookup decoding. With --engine llama.cpp the baseline is llama.cpp's own greedy
decoding of the same GGUF and our loop runs on llama.cpp. Methods are interleaved per prompt,
in an order rotated per prompt, so that drift on a shared machine hits all alike. Writes report.json,
report.md and PNG plots to --out.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .backbone import chat_ids
from .bench_cli import LLAMACPP_METHODS, METHODS
from .calibrate import _console, finalist_name, load_parts, machine, progress, run_calibrate, step_latency
from .errors import UserError, output_dir, output_file
from .few_rows import activations, rounds_activations
from .llama_forward import rounds_cache
from .lookup import LookupConfig
from .questions import load_questions

LABELS = {"transformers": "transformers generate (baseline)", "llamacpp": "llama.cpp greedy (baseline)",
          "loop": "our loop, no heads",
          "speculative": "our loop + heads (speculative)", "lookup": "our loop + prompt lookup (and n-gram store), no heads",
          "hybrid": "our loop + heads + prompt lookup (and n-gram store) (hybrid)", "prompt_lookup": "transformers prompt lookup"}
LOOKUP_METHODS = ("lookup", "hybrid")


# ----------------------------------------------------------------------------------------- running

def _hf_generate(model, ids: list[int], max_new_tokens: int, eos: set[int], pad: int, lookup: int | None) -> list[int]:
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=sorted(eos),
                           pad_token_id=pad, prompt_lookup_num_tokens=lookup)
    x = torch.tensor([ids], device=model.device)
    out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=cfg)[0, len(ids):].tolist()
    cut = next((i for i, t in enumerate(out) if t in eos), len(out))  # our loop does not return the EOS
    return out[:cut]


class Runner:
    """One callable per method: ids -> (new token ids, Stats or None). All share one backbone."""

    def __init__(self, dm, plain, lookup):
        from .backbone import Backbone
        from .draftmodel import DraftModel

        bb = Backbone(plain.backbone, plain.tokenizer, plain.backbone_name, dm.engine)
        # speculative is the heads alone whatever --lookup says; lookup and hybrid add the lookup's branches. Each keeps
        # its tree's cut for one sequence (a calibrated tree's, none for --tree); where calibrate chose the heads' tree
        # beside the lookup and without it apart, each method takes its own
        alone, both = dm.tree_for(False), dm.tree_for(True)
        self.ours = {"loop": plain, "speculative": DraftModel(bb, dm.heads, alone[0], batch_cuts=alone[1]),
                     "lookup": DraftModel(bb, None, None, lookup, ngrams=dm.ngrams),
                     "hybrid": DraftModel(bb, dm.heads, both[0], lookup, batch_cuts=both[1], ngrams=dm.ngrams)}
        self.plain, self.engine = plain, dm.engine  # engine: None (torch) or the llama.cpp engine
        self.eos = plain.eos_ids
        tok = plain.tokenizer
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else min(self.eos)

    def __call__(self, method: str, ids: list[int], max_new_tokens: int):
        model = self.plain.backbone
        if method in self.ours:
            r = self.ours[method].generate(torch.tensor(ids), max_new_tokens=max_new_tokens)
            return r.token_ids, r.stats
        if method == "llamacpp":
            return self.engine.greedy(ids, max_new_tokens, self.eos), None
        lookup = 10 if method == "prompt_lookup" else None
        return _hf_generate(model, ids, max_new_tokens, self.eos, self.pad, lookup), None

    def next_logits(self, ids: list[int]) -> torch.Tensor:
        """The baseline backbone's logits [vocab] after ids: where a greedy output parted from it, why."""
        if self.engine is not None:
            e = self.engine
            return e.prefill(e.new_cache(len(ids)), torch.tensor(ids), "none")[1].clone()
        model = self.plain.backbone
        return model(input_ids=torch.tensor([ids], device=model.device)).logits[0, -1]


def _sync(device) -> float:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def run_bench(args) -> dict:
    llamacpp = getattr(args, "engine", None) == "llama.cpp" or str(args.backbone or "").lower().endswith(".gguf")
    allowed = LLAMACPP_METHODS if llamacpp else METHODS
    baseline = allowed[0]
    methods = [m.strip() for m in (args.methods or ",".join(allowed)).split(",") if m.strip()]
    bad = [m for m in methods if m not in allowed]
    if bad or baseline not in methods:
        raise UserError(f"--methods must name {baseline} and any of {', '.join(allowed)}; got {args.methods!r}")
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    cats = [c.strip() for c in args.categories.split(",")] if args.categories else None
    questions = load_questions(args.questions, args.limit, cats)
    if getattr(args, "lookup", None) is False:  # --no-lookup: skip our lookup methods
        methods = [m for m in methods if m not in LOOKUP_METHODS]
    dm, plain = load_parts(args)
    lookup = dm.lookup or LookupConfig()
    run, tok = Runner(dm, plain, lookup), plain.tokenizer
    records, mismatches, rounding = [], [], []
    # Exactness is checked against the reference: transformers' generate in fp32, where every path rounds
    # alike to within ties; in reduced precision (any device), with int8 activations on GGUF-block weights
    # (few_rows) or a float16 cache (--kv-cache), our own loop, whose kernels round otherwise than transformers'
    # stock ones (on a CPU its row-exact ones: another rounding of the model, not an error, reported apart).
    dtype = dm.backbone.dtype
    ours_rounds = dtype != torch.float32 or rounds_activations(dm.backbone) or rounds_cache(dm.backbone)
    reference = "loop" if ours_rounds and dm.engine is None and "loop" in methods else baseline
    tie = max(1e-3, 4 * torch.finfo(dtype).eps * 32)  # a few units in the last place of a logit of ~32
    with progress() as bar:
        first = chat_ids(tok, questions[0].turns[0])
        for m in methods:  # warm-up: first calls pay for lazy init, allocator growth, kernel selection
            run(m, first, min(args.max_new_tokens, 16))
        task = bar.add_task("bench", total=sum(len(q.turns) for q in questions) * len(methods))
        slot = 0
        for q in questions:
            history: list[dict] = []
            for turn, text in enumerate(q.turns):
                history.append({"role": "user", "content": text})
                ids = chat_ids(tok, history)
                order = methods[slot % len(methods):] + methods[:slot % len(methods)]
                slot += 1
                outs = {}
                for m in order:
                    t0 = _sync(args.device)
                    tokens, stats = run(m, ids, args.max_new_tokens)
                    seconds = _sync(args.device) - t0
                    outs[m] = tokens
                    records.append({"question_id": q.qid, "category": q.category, "turn": turn, "method": m,
                                    "prompt_tokens": len(ids), "new_tokens": len(tokens), "seconds": seconds,
                                    "stats": None if stats is None else {
                                        "steps": stats.steps, "accepted": stats.accepted, "draft_s": stats.draft_s,
                                        "verify_s": stats.verify_s, "accept_s": stats.accept_s,
                                        "prefill_s": stats.prefill_s, "tree_size": stats.tree_size,
                                        "nodes": stats.nodes, "lookup_accepted": stats.lookup_accepted}})
                    bar.advance(task)
                for m in order:
                    ref = reference if m not in (baseline, reference) else baseline
                    if m != ref and outs[m] != outs[ref]:
                        exact = ref == reference  # else another rounding of the model: no tie to judge by
                        (mismatches if exact else rounding).append(
                            _explain(run.next_logits, ids, outs[ref], outs[m], q, turn, m, tie if exact else None))
                # Multi-turn: the baseline's own answer is the history for every method, so all methods
                # decode the very same prompts in the next turn.
                history.append({"role": "assistant", "content": tok.decode(outs[baseline], skip_special_tokens=True)})
        latency = []
        if "speculative" in methods and args.latency_sizes:
            task = bar.add_task("verify latency", total=None)
            latency = step_latency(dm, first, args.latency_sizes, steps=args.latency_steps)
            bar.update(task, total=1, completed=1)
    return _report(args, dm, methods, records, mismatches, latency, lookup, reference, rounding)


@torch.inference_mode()
def _explain(next_logits, ids, base, other, q, turn, method, tie: float | None) -> dict:
    """Where a greedy output left the baseline's, and the backbone's top-2 logit gap there (on the
    baseline's prefix): a gap at float-rounding size means two tokens tied and batched tree
    verification rounded the other way; a large gap means a bug. tie None: the two outputs come from two
    roundings of the model (transformers' float32 products against int8 activations or bf16 kernels),
    which part at gaps far above a float tie: the gap is reported, not judged."""
    i = next((j for j, (a, b) in enumerate(zip(base, other)) if a != b), min(len(base), len(other)))
    gap = None
    if i < len(base) and i < len(other):
        top = next_logits(ids + base[:i]).float().topk(2).values
        gap = float(top[0] - top[1])
    return {"question_id": q.qid, "category": q.category, "turn": turn, "method": method, "first_difference": i,
            "baseline_tokens": len(base), "method_tokens": len(other), "top2_logit_gap": gap,
            "explanation": ("length differs (one stopped early)" if gap is None else
                            "another rounding of the model" if tie is None else
                            "near-tie of the two best tokens (float rounding)" if gap < tie else
                            "NOT a tie: the outputs should agree")}


# ----------------------------------------------------------------------------------------- report

def baseline_of(methods) -> str:
    """The run's baseline: transformers' generate (torch engine) or llama.cpp's greedy decoding."""
    return next(m for m in methods if m in (METHODS[0], LLAMACPP_METHODS[0]))


def _aggregate(records: list[dict], methods: list[str]) -> dict:
    out = {}
    for m in methods:
        rs = [r for r in records if r["method"] == m]
        tokens, seconds = sum(r["new_tokens"] for r in rs), sum(r["seconds"] for r in rs)
        row = {"generations": len(rs), "new_tokens": tokens, "seconds": seconds,
               "tokens_per_s": tokens / seconds if seconds else 0.0}
        st = [r["stats"] for r in rs if r["stats"]]
        if st:
            steps = sum(s["steps"] for s in st)
            acc = [a for s in st for a in s["accepted"]]
            row.update(steps=steps, mean_accepted=sum(acc) / max(len(acc), 1),
                       nodes_per_step=sum(s["nodes"] for s in st) / max(steps, 1),
                       lookup_accepted=sum(s["lookup_accepted"] for s in st),
                       **{f"{k}_ms_per_step": 1e3 * sum(s[f"{k}_s"] for s in st) / max(steps, 1)
                          for k in ("draft", "verify", "accept")})
        out[m] = row
    base = out[baseline_of(methods)]["tokens_per_s"]
    for row in out.values():
        row["speedup"] = row["tokens_per_s"] / base if base else 0.0
    return out


def _trees_said(c: dict) -> str:
    """The tree (and cut) each method with heads ran, as the report's header says it."""
    def one(tree_size: int, cut: float) -> str:
        return f"tree of {tree_size} nodes" + (f", cut to the nodes the heads give a path probability of {cut} or more"
                                               if cut else "")

    by = c.get("tree_by_method")
    if not by:
        return one(c["tree_size"], c.get("cut"))
    return "; ".join(f"{m}: {one(len(t['tree']) + 1, t['cut'])}" for m, t in by.items()) + " (calibrated apart)"


def _report(args, dm, methods, records, mismatches, latency, lookup, reference, rounding) -> dict:
    cats = sorted({r["category"] for r in records})
    acc = [a for r in records if r["method"] == "speculative" and r["stats"] for a in r["stats"]["accepted"]]
    histogram: dict[int, int] = {}
    for a in acc:
        histogram[a] = histogram.get(a, 0) + 1
    return {
        "config": {"questions": str(args.questions), "limit": args.limit, "max_new_tokens": args.max_new_tokens,
                   "categories": cats, "heads": str(args.heads), "backbone": dm.backbone_name,
                   "tree": dm.tree.to_json() if dm.tree else None, "tree_size": dm.tree.size if dm.tree else 1,
                   "cut": dm.batch_cuts.get(1, 0.0),  # the path probability a node needs (0: every node)
                   # each method's tree and cut where calibrate chose them beside prompt lookup and without it apart
                   "tree_by_method": ({m: {"tree": dm.tree_for(on)[0].to_json(), "cut": dm.tree_for(on)[1].get(1, 0.0)}
                                       for m, on in (("speculative", False), ("hybrid", True))} if dm.tree_by_lookup else None),
                   "num_heads": dm.heads.cfg.num_heads, "device": args.device, "dtype": str(dm.backbone.dtype),
                   "activations": activations() if rounds_activations(dm.backbone) else "as the dtype",
                   "kv_cache": "float16" if rounds_cache(dm.backbone) else "as the dtype",
                   "engine": f"llama.cpp ({dm.engine.description})" if dm.engine is not None else "torch",
                   "baseline": baseline_of(methods), "exactness_reference": reference,
                   "lookup": asdict(lookup),
                   # the backbone's n-gram store the lookup methods draft from (ngrams.py), or None
                   "ngram_store": {"contexts": dm.ngrams.entries, **dm.ngrams.meta} if dm.ngrams else None,
                   "methods": methods, "machine": machine(), "timing": "new tokens / wall time of the whole generate call"},
        "overall": _aggregate(records, methods),
        "per_category": {c: _aggregate([r for r in records if r["category"] == c], methods) for c in cats},
        "greedy_mismatches": {"count": len(mismatches), "items": mismatches},  # against the exactness reference
        "baseline_rounding_differences": {"count": len(rounding), "items": rounding},  # when that is not the baseline
        "accepted_histogram": dict(sorted(histogram.items())),
        "verify_latency": latency,
        "records": [{**r, "stats": None if r["stats"] is None else {k: v for k, v in r["stats"].items() if k != "accepted"}}
                    for r in records],
    }


def _fmt(v, spec=".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def write_markdown(rep: dict, path: Path) -> None:
    c, o = rep["config"], rep["overall"]
    lines = [f"# draftheads bench: {c['backbone']}", "",
             f"Questions `{c['questions']}` ({o[baseline_of(o)]['generations']} generations per method), "
             f"max_new_tokens {c['max_new_tokens']}, greedy, batch 1, engine {c.get('engine', 'torch')}, "
             f"device {c['device']} ({c['dtype']}), "
             f"heads `{c['heads']}` ({c['num_heads']} heads), " + _trees_said(c) + ". "
             f"Machine: {c['machine']['processor']}, {c['machine']['cpu_count']} CPUs, torch {c['machine']['torch']}, "
             f"torch threads: {c['machine']['torch_threads']}, load average (1, 5, 15 min) when written: {c['machine'].get('load_average')}. Tokens/s = {c['timing']}.", "",
             "| method | tokens/s | speedup | mean accepted | nodes/step | draft ms/step | verify ms/step | accept ms/step | tokens |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m, r in o.items():
        lines.append(f"| {LABELS[m]} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {_fmt(r.get('mean_accepted'))} | "
                     f"{_fmt(r.get('nodes_per_step'), '.1f')} | "
                     f"{_fmt(r.get('draft_ms_per_step'), '.1f')} | {_fmt(r.get('verify_ms_per_step'), '.1f')} | "
                     f"{_fmt(r.get('accept_ms_per_step'), '.1f')} | {r['new_tokens']} |")
    # What the heads themselves buy: speculative over our own loop without heads, same prompts, same run.
    own = "loop" in o and "speculative" in o
    lines += ["", "## Speedup per category", "", "| category | " + " | ".join(LABELS[m] for m in o)
              + (" | heads over our own loop |" if own else " |"), "|---" * (len(o) + 1 + own) + "|"]
    for cat, rows in [*rep["per_category"].items(), ("overall", o)]:
        cells = [f"{rows[m]['speedup']:.2f}x ({rows[m]['tokens_per_s']:.1f} tok/s)" for m in o]
        if own:
            cells.append(f"{rows['speculative']['tokens_per_s'] / rows['loop']['tokens_per_s']:.2f}x")
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    ref = c.get("exactness_reference", baseline_of(o))
    sections = [(f"Greedy outputs that differ from {LABELS[ref]}", rep["greedy_mismatches"])]
    if ref != baseline_of(o):
        int8 = (", int8 activations" if c.get("activations") == "int8" else "") + (
            ", float16 cache" if c.get("kv_cache") == "float16" else "")
        sections.append((f"{LABELS[baseline_of(o)]} against {LABELS[ref]} (another rounding of the model in "
                         f"{c['dtype']}{int8}: stock kernels against ours; not an error)",
                         rep["baseline_rounding_differences"]))
    for title, mm in sections:
        lines += ["", f"## {title}: {mm['count']}", ""]
        for x in mm["items"]:
            lines.append(f"- question {x['question_id']} turn {x['turn']} ({x['method']}): first difference at token "
                         f"{x['first_difference']}, top-2 logit gap {_fmt(x['top2_logit_gap'], '.2e')}: {x['explanation']}")
    if rep["verify_latency"]:
        lines += ["", "## Step latency vs tree size (median per step, our loop)", "",
                  "| nodes | draft ms | verify ms | accept ms | step ms |", "|---|---|---|---|---|"]
        for x in rep["verify_latency"]:
            lines.append(f"| {x['size']} | {x['draft_s'] * 1e3:.1f} | {x['verify_s'] * 1e3:.1f} | "
                         f"{x['accept_s'] * 1e3:.1f} | {x['step_s'] * 1e3:.1f} |")
    lines += ["", "Plots: speedup_per_category.png, accepted_lengths.png, verify_latency.png", ""]
    path.write_text("\n".join(lines))


def write_plots(rep: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    files = []
    cats = list(rep["per_category"]) + ["overall"]
    baseline = baseline_of(rep["overall"])
    methods = [m for m in rep["overall"] if m != baseline]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cats)), 4))
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        vals = [rep["per_category"][c][m]["speedup"] for c in cats[:-1]] + [rep["overall"][m]["speedup"]]
        ax.bar([x + i * width for x in range(len(cats))], vals, width, label=LABELS[m])
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(cats))], cats, rotation=30, ha="right")
    ax.set_ylabel(f"speedup over {LABELS[baseline].removesuffix(' (baseline)')}")
    # Above the axes, not inside: inside, the legend hides the tallest bars.
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.01), ncol=2, frameon=False)
    files.append(_save(fig, out / "speedup_per_category.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    h = rep["accepted_histogram"]
    ax.bar([int(k) for k in h], list(h.values()))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no 1.5 tokens, no 2.5 steps
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("tokens accepted per step (backbone's own included)")
    ax.set_ylabel("steps")
    ax.set_title("speculative: accepted lengths")
    files.append(_save(fig, out / "accepted_lengths.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    lat = rep["verify_latency"]
    if lat:
        xs = [x["size"] for x in lat]
        ax.plot(xs, [x["verify_s"] * 1e3 for x in lat], "o-", label="verify")
        ax.plot(xs, [x["step_s"] * 1e3 for x in lat], "s--", label="whole step")
        ax.set_xscale("log", base=2)
        ax.legend()
    ax.set_xlabel("tree nodes (root included)")
    ax.set_ylabel("ms per step")
    ax.set_title("verify latency vs tree size")
    files.append(_save(fig, out / "verify_latency.png"))
    return files


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")  # "tight": a legend outside the axes is kept whole
    plt.close(fig)
    return path.name


def print_summary(rep: dict) -> None:
    from rich.table import Table

    t = Table(title=f"draftheads bench ({rep['config']['backbone']}, tree {rep['config']['tree_size']} nodes)")
    for col in ("method", "tok/s", "speedup", "accepted/step", "draft/verify/accept ms"):
        t.add_column(col, justify="left" if col == "method" else "right")
    for m, r in rep["overall"].items():
        split = ("/".join(_fmt(r.get(f"{k}_ms_per_step"), ".1f") for k in ("draft", "verify", "accept"))
                 if "steps" in r else "n/a")
        t.add_row(LABELS[m], f"{r['tokens_per_s']:.1f}", f"{r['speedup']:.2f}x", _fmt(r.get("mean_accepted")), split)
    con = _console()
    con.print(t)
    mm = rep["greedy_mismatches"]["count"]
    c = rep["config"]
    ref = LABELS[c.get("exactness_reference", c["baseline"])].split(" (")[0]
    con.print(f"greedy outputs differing from {ref}: {mm}" + (" (see report.md)" if mm else ""))
    if c.get("exactness_reference", c["baseline"]) != c["baseline"]:
        con.print(f"{LABELS[rep['config']['baseline']].split(' (')[0]} against {ref}: "
                  f"{rep['baseline_rounding_differences']['count']} differ (another rounding: {rep['config']['dtype']}"
                  + (", int8 activations" if rep["config"].get("activations") == "int8" else "")
                  + (", float16 cache)" if rep["config"].get("kv_cache") == "float16" else ")"))


def cmd_bench(args) -> None:
    out = output_dir(args.out, "--out")  # before the run: a report that cannot be written loses the whole of it
    rep = run_bench(args)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(rep, indent=1))
    write_markdown(rep, out / "report.md")
    write_plots(rep, out)
    print_summary(rep)
    _console().print(f"wrote {out}/report.json, report.md, speedup_per_category.png, accepted_lengths.png, verify_latency.png")


# ----------------------------------------------------------------------------------------- calibrate

def cmd_calibrate(args) -> None:
    from .draftmodel import heads_dir

    if args.cpu_class:
        from .few_rows import cpu_class

        if not args.write_to_heads or not str(args.device).startswith("cpu") or cpu_class() is None:
            raise UserError("--cpu-class stores a CPU's calibration: it needs --write-to-heads, --device cpu and an x86-64 "
                            "CPU with AVX2 and FMA (the kernels' classes)")
    out = output_file(args.out, "--out")
    result = run_calibrate(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    if args.write_to_heads:
        lookup = result.get("lookup")
        _write_tree_to_heads(heads_dir(args.heads), result["tree"], result.get("batch_trees"), result["calibrated_for"],
                             result.get("draft_confidence"), lookup["on"] if lookup else None,
                             lookup["heads_alone"] if lookup and lookup["on"] else None)
    con = _console()
    m63 = result["medusa63"]
    con.print(f"accuracy (conditional, rank 0 per head): {', '.join(f'{row[0]:.2f}' for row in result['accuracy'])} "
              f"over {result['positions']} positions")
    if "draft_confidence" in result:
        con.print(f"one sequence: the chain of {result['depth']} cut at path probability {result['draft_confidence']} "
                  f"({result['predicted_rows']:.2f} rows a step), predicted {result['predicted_tokens_per_s']:.1f} tok/s "
                  f"against {result['whole_tree_predicted_tokens_per_s']:.1f} for the best whole tree ({len(result['whole_tree']) + 1} nodes)")
    for c in result.get("chosen_by_replies", {}).get("candidates", []):
        con.print(f"one sequence, whole replies: {finalist_name(c)}: {c['measured_tokens_per_s']:.1f} tok/s, "
                  f"{c['measured_mean_accepted']:.3f} accepted (predicted {c['predicted_tokens_per_s']:.1f})")
    con.print(f"chosen tree: {result['size']} nodes, depth {result['depth']} ({result['search']}); predicted mean "
              f"accepted {result['predicted_mean_accepted']:.3f} (empirical on calibration positions "
              f"{result['predicted_mean_accepted_empirical']:.3f}), predicted {result['predicted_tokens_per_s']:.1f} tok/s "
              f"(loop steps only); medusa63 truncated ({m63['size']} nodes): {m63['predicted_mean_accepted']:.3f} accepted, "
              f"{m63['predicted_tokens_per_s']:.1f} tok/s")
    if "measured" in result:
        ms = result["measured"]
        con.print(f"measured: calibrated {ms['calibrated']['mean_accepted']:.3f} accepted/step, "
                  f"{ms['calibrated']['tokens_per_s']:.1f} tok/s; medusa63 {ms['medusa63']['mean_accepted']:.3f}, "
                  f"{ms['medusa63']['tokens_per_s']:.1f} tok/s; prediction error {100 * result['prediction_error']:+.1f}%, "
                  f"tokens/s vs medusa63 {result['speedup_vs_medusa63']:.2f}x")
    if "lookup" in result:
        lk = result["lookup"]
        con.print(f"prompt lookup: matches at {100 * lk['match_rate']:.0f}% of positions, {lk['mean_nodes']:.1f} nodes/step; "
                  f"mean accepted on calibration positions: heads {lk['mean_accepted_heads_only']:.3f}, lookup "
                  f"{lk['mean_accepted_lookup_only']:.3f}, both {lk['mean_accepted_hybrid']:.3f}")
        tps = "measured_tokens_per_s" if lk["decided_by"] == "replies" else "predicted_tokens_per_s"
        alone, both = lk["heads_alone"], lk["with_lookup"]
        con.print(f"prompt lookup beside the heads: {'on' if lk['on'] else 'off'} (by {lk['decided_by']}: heads alone "
                  f"{len(alone['tree']) + 1} nodes {alone[tps]:.1f} tok/s, with lookup {len(both['tree']) + 1} nodes "
                  f"{both[tps]:.1f} tok/s; the trees tried with it: "
                  + ", ".join(f"{len(c['tree']) + 1} nodes {c[tps]:.1f}" for c in lk["with_lookup_candidates"]) + ")")
    for b, row in result.get("batch_trees", {}).items():
        cut = (f" (cut at {row['draft_confidence']}: {row['predicted_rows']:.2f} rows a sequence)"
               if "predicted_rows" in row else "")
        con.print(f"batch of {b}: tree of {row['size']} nodes{cut}, predicted {row['predicted_tokens_per_s']:.1f} tok/s "
                  f"for all {b} (without trees {row['plain_tokens_per_s']:.1f})")
    con.print(f"wrote {out}" + (f" and the tree into {heads_dir(args.heads)}/config.json" if args.write_to_heads else ""))


def _write_tree_to_heads(directory: Path, tree: list[list[int]], batch_trees: dict | None = None,
                         where: str = "cpu float32", cut: float | None = None, lookup: bool | None = None,
                         heads_alone: dict | None = None) -> None:
    """Store the tree (and trees per batch size) in the heads' config: as its own `tree` for a CPU in
    float32, else under device_trees[where] ("cpu bfloat16", "cuda bfloat16"), which `load` takes there.
    cut: the path probability one sequence's nodes need (batch_draft_confidence["1"]), None: whole trees.
    lookup: whether prompt lookup paid beside the tree (`calibrate --lookup`); None: not decided, and an earlier
    decision, made for an earlier tree, is dropped (load's default rule applies). heads_alone: where lookup paid, the
    heads' own choice without it ({"tree", "draft_confidence"}, calibrate's), which load takes with lookup off."""
    from .draftmodel import DEFAULT_TREES_KEY
    from .heads.checkpoint import _atomic_write, read_config

    cfg = read_config(directory)
    if where == DEFAULT_TREES_KEY:
        entry = cfg
    else:
        cfg["device_trees"] = cfg.get("device_trees") or {}  # saved heads carry null
        entry = cfg["device_trees"].setdefault(where, {})
    entry["tree"] = tree
    if lookup is None:
        entry.pop("lookup", None)
    else:
        entry["lookup"] = lookup
    if heads_alone is None:  # `tree` serves with lookup and without
        entry.pop("heads_alone", None)
    else:
        entry["heads_alone"] = {"tree": heads_alone["tree"], "draft_confidence": heads_alone.get("draft_confidence") or None}
    if batch_trees:
        entry["batch_trees"] = {b: row["tree"] for b, row in batch_trees.items()}
        cuts = {b: row["draft_confidence"] for b, row in batch_trees.items() if "draft_confidence" in row}
        if cuts:
            entry["batch_draft_confidence"] = cuts
        else:  # a table of batch size 1 alone: no cut left over from an earlier calibration
            entry.pop("batch_draft_confidence", None)
    else:  # the tree for one sequence only: it and its cut replace an earlier one's, the batch sizes' stay
        cuts = {b: c for b, c in (entry.get("batch_draft_confidence") or {}).items() if b != "1"}
        entry["batch_draft_confidence"] = {"1": cut, **cuts} if cut else cuts or None
        if "1" in (entry.get("batch_trees") or {}):  # a lone server request decodes as the loop does
            entry["batch_trees"]["1"] = tree
    if batch_trees and cut and "1" not in batch_trees:  # a table without batch size 1: the cut for one sequence
        entry["batch_draft_confidence"] = {"1": cut, **(entry.get("batch_draft_confidence") or {})}
    _atomic_write(directory / "config.json", lambda p: Path(p).write_text(json.dumps(cfg, indent=1) + "\n"))

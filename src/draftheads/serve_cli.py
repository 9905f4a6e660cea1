"""`draftheads serve`, `draftheads chat` and `draftheads export`: registered into cli.py's parser."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import defaults
from .cli import _add_model_args, _load, add_threads
from .errors import UserError, at_least, output_dir


def cmd_serve(args) -> None:
    from .server import serve

    _check_limits(args)
    _check_port(args.host, args.port)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"draftheads: warning: serving on {args.host} without an API key: anyone who can reach it can use it",
              file=sys.stderr)
    model = _load(args)
    serve(model, host=args.host, port=args.port, model_name=args.model_name, api_key=args.api_key,
          max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
          max_tokens_limit=args.max_tokens_limit, queue_size=args.queue_size,
          parse_special_tokens=args.parse_special_tokens, max_batch=args.max_batch, max_seq_len=args.max_seq_len,
          max_tree_rows=_tree_rows(args, model), prefill_chunk=args.prefill_chunk or None,
          adapt_trees=args.adapt_trees, draft_confidence=args.draft_confidence,
          prompt_cache_tokens=args.prompt_cache_tokens)


def _check_port(host: str, port: int) -> None:
    """A port another process listens on is refused before the model loads (uvicorn would say so only after)."""
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def _tree_rows(args, model) -> int | None:
    """--max-tree-rows, by default a budget of MAX_TREE_ROWS nodes per pass unless the heads carry a tree per
    batch size."""
    if args.max_tree_rows is None:
        return None if model.batch_trees else defaults.MAX_TREE_ROWS
    return args.max_tree_rows or None


def cmd_chat(args) -> None:
    from .chat import run_chat

    run_chat(_load(args), max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
             system=args.system, seed=args.seed)


def cmd_export(args) -> None:
    from .backbone import load_backbone
    from .draftmodel import heads_dir
    from .heads import load_heads
    from .heads.export import check_exportable, export_heads

    source = heads_dir(args.heads)  # "default" is the shipped heads, as for every other command
    if (output_dir(args.out, "--out") / "config.json").exists():  # the source heads themselves, or any others
        raise UserError(f"--out {args.out} already holds a config.json (heads or a model): export writes into a new "
                        "or empty directory, never over one")
    raw = check_exportable(source)
    heads, weight, tuned = load_heads(source), None, None
    if raw.get("adapter"):
        # Medusa-2: engines know nothing of our adapter, so the backbone with the adapter merged is written
        # beside the heads, and the heads name it as their backbone.
        from .adapter import prepare_backbone, save_backbone

        bb = prepare_backbone(load_backbone(args.backbone or heads.cfg.backbone), source, raw)
        heads = load_heads(source, bb.model)
        weight = bb.model.get_output_embeddings().weight
        tuned = (Path(args.out).expanduser() / "backbone").resolve()
        heads.cfg.backbone, heads.cfg.adapter = str(tuned), None
    elif (args.to == "vllm" and heads.cfg.lm_head == "shared") or args.backbone:
        # vLLM reads a shared LM head from the draft checkpoint, so it has to be copied from the backbone.
        bb = load_backbone(args.backbone or heads.cfg.backbone or raw.get("base_model_name_or_path"))
        heads = load_heads(source, bb.model)
        weight = bb.model.get_output_embeddings().weight
    out = export_heads(heads, args.out, args.to, backbone_weight=weight)
    if tuned is not None:  # written once the heads were, so that a refused layout writes nothing
        save_backbone(bb.model, bb.tokenizer, tuned)
        print(f"wrote {tuned}: the backbone with the Medusa-2 adapter merged; serve the heads with THIS backbone")
    hint = {"vllm": f'vllm serve {tuned or "<backbone>"} --speculative-config \'{{"method": "medusa", "model": "{out}", '
                    f'"num_speculative_tokens": {heads.cfg.num_heads}}}\'',
            "tgi": f"text-generation-launcher --model-id {out}  (the backbone comes from base_model_name_or_path)",
            "medusa": "FasterDecoding/Medusa or TensorRT-LLM's examples/medusa/convert_checkpoint.py "
                      f"--medusa_model_dir {out} --num_medusa_heads {heads.cfg.num_heads}"}[args.to]
    print(f"wrote {out} ({args.to} layout, {heads.cfg.num_heads} heads)\nuse: {hint}")


def register(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)")
    _add_model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    s.add_argument("--port", type=at_least(0, 65535), default=8000, help="TCP port to listen on")
    s.add_argument("--api-key", default=os.environ.get("DRAFTHEADS_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $DRAFTHEADS_API_KEY)")
    s.add_argument("--model-name", default=None, help="model id clients send (default: the backbone's name)")
    s.add_argument("--max-body-bytes", type=int, default=defaults.MAX_BODY_BYTES,
                   help="largest request body in bytes (default 1 MiB)")
    s.add_argument("--max-prompt-tokens", type=int, default=defaults.MAX_PROMPT_TOKENS,
                   help="longest prompt, also capped by the context")
    s.add_argument("--max-tokens-limit", type=int, default=defaults.MAX_TOKENS_LIMIT,
                   help="largest max_tokens a request may ask for")
    s.add_argument("--queue-size", type=int, default=defaults.QUEUE_SIZE,
                   help="requests that may wait; more get 429")
    s.add_argument("--max-batch", type=int, default=defaults.MAX_BATCH,
                   help="requests decoded together, one verify pass for all (continuous batching; 1: one at a time)")
    s.add_argument("--max-tree-rows", type=int, default=None,
                   help="most tree nodes one batched pass verifies; past it the running requests decode plainly in "
                        "that pass (0: no limit; default: none when the heads carry a tree per batch size, from "
                        f"`calibrate --batch-sizes`, else {defaults.MAX_TREE_ROWS}: a CPU's matmuls turn compute-bound "
                        "at a few rows)")
    s.add_argument("--adapt-trees", action=argparse.BooleanOptionalAction, default=defaults.ADAPT_TREES,
                   help="per batch size, decode with the heads' trees or plainly, whichever the server's own rounds "
                        "measured faster (tokens/s on /health); --no-adapt-trees always takes the trees")
    s.add_argument("--draft-confidence", type=float, default=None,
                   help="in a batched pass of two or more requests, verify only the tree nodes whose path the heads "
                        "give at least this probability (each node costs a row of the pass; 0: every node; default: "
                        "the one `calibrate --batch-sizes` chose per batch size with the heads' trees, else "
                        f"{defaults.BATCH_DRAFT_CONFIDENCE})")
    s.add_argument("--prefill-chunk", type=int, default=defaults.PREFILL_CHUNK,
                   help="prompt tokens prefilled between two batched passes, so that a long prompt does not stall "
                        "the running streams (0: whole prompts at once)")
    s.add_argument("--prompt-cache-tokens", type=int, default=defaults.PROMPT_CACHE_TOKENS,
                   help="tokens of recent prompts whose keys are kept, so that a request starting as an earlier one "
                        "did (a chat's system prompt) prefills only the rest (prefix caching; 0: off; not in bf16 "
                        "or fp16 on a CPU, where every prompt is prefilled whole)")
    s.add_argument("--max-seq-len", type=int, default=defaults.MAX_SEQ_LEN,
                   help="tokens per batched request (prompt + reply); its KV cache slot is preallocated")
    s.add_argument("--parse-special-tokens", action="store_true",
                   help="let a /v1/completions string prompt spell control tokens such as <|im_start|> (default: "
                        "they are plain text; chat messages are always plain text)")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("chat", help="interactive multi-turn chat in the terminal (/reset, /exit)")
    _add_model_args(c)
    c.add_argument("--max-new-tokens", type=at_least(1), default=defaults.MAX_NEW_TOKENS,
                   help="most new tokens per reply; the reply usually ends earlier, at the end-of-turn token")
    c.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: exact sampling")
    c.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                                                            "holding this probability (1: off)")
    c.add_argument("--system", default=None, help="system message kept at the top of the conversation")
    c.add_argument("--seed", type=at_least(-2**63, 2**64 - 1), default=None, help="random seed for sampling (default: unseeded)")
    c.set_defaults(func=cmd_chat)

    e = sub.add_parser("export", help="write heads in a serving engine's layout (vllm, medusa, tgi)")
    e.add_argument("--heads", required=True,
                   help="heads directory (any layout load_heads reads) or 'default' (the shipped heads)")
    e.add_argument("--to", required=True, choices=["vllm", "medusa", "tgi"], help="the serving engine's layout")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--backbone", default=None,
                   help="backbone to check the heads against; needed for shared-LM-head heads going to vLLM. Medusa-2 "
                        "heads: the original backbone, which gets their adapter merged and is written to <out>/backbone")
    add_threads(e)  # loading a backbone for the check runs torch
    e.set_defaults(func=cmd_export)


MIN_SEQ_LEN = 64


def _check_limits(args) -> None:
    for name in ("max_body_bytes", "max_prompt_tokens", "max_tokens_limit", "queue_size", "max_batch", "max_seq_len"):
        if getattr(args, name, 1) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("max_tree_rows", "prefill_chunk", "prompt_cache_tokens"):
        if (getattr(args, name, 0) or 0) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 or more")
    if getattr(args, "max_seq_len", MIN_SEQ_LEN) < MIN_SEQ_LEN:  # smaller, every chat prompt would be refused
        raise UserError(f"--max-seq-len must be at least {MIN_SEQ_LEN} (a slot holds the prompt, the reply and a tree)")
    if not 0 <= (getattr(args, "draft_confidence", None) or 0.0) < 1:
        raise UserError("--draft-confidence must be at least 0 and below 1")

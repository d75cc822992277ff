"""The ``nvlm`` command: chat | demo | plan | quantize | bench | train | eval.

Errors print one line (``nvlm: error: ...``) and exit with status 2; ``--debug`` shows the traceback instead.
Heavy imports happen inside each subcommand so ``nvlm --help`` is instant.
"""

import argparse
import sys
import time

DEMO_QUESTION = "What colour is the shape on the left?"


def _add_chat(sub):
    p = sub.add_parser("chat", help="answer a question about one or more images (streams the answer)")
    p.add_argument("question", help="the question; a bare question is wrapped in the ChatML prompt")
    p.add_argument("--model", required=True, help="checkpoint folder (published NVLM-D layout or our quantised one)")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several images)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--quant", default=None, choices=["int8", "int4", "bnb-nf4", "bnb-int8"],
                   help="quantise while loading (a quantised checkpoint needs no flag)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel degree: run under `torchrun --nproc-per-node N` with --tp N (gloo on CPU, "
                        "NCCL with --device cuda: each rank uses cuda:LOCAL_RANK)")
    p.set_defaults(func=cmd_chat)


def _add_demo(sub):
    p = sub.add_parser("demo", help="the main job on the embedded default: int4 model answers about an example image")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded tiny model)")
    p.add_argument("--image", default=None, help="image file (default: the shipped example image)")
    p.add_argument("--question", default=DEMO_QUESTION)
    p.add_argument("--quant", default="int4", choices=["none", "int8", "int4"])
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.set_defaults(func=cmd_demo)


def _add_plan(sub):
    p = sub.add_parser("plan", help="memory plan: bytes per part, GPUs needed, KV tokens that fit")
    p.add_argument("--model", default="nvlm-d-72b", help="preset name or checkpoint folder")
    p.add_argument("--quant", default="int4", choices=["bf16", "int8", "int4"])
    p.add_argument("--gpu", default="h100-80gb", choices=["h100-80gb", "h200", "a100-80gb"])
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--tp", type=int, default=None, help="also give the bytes per GPU at this tensor-parallel degree")
    p.set_defaults(func=cmd_plan)


def _add_quantize(sub):
    p = sub.add_parser("quantize", help="quantise a checkpoint while streaming it and save the result")
    p.add_argument("--model", required=True, help="source checkpoint folder")
    p.add_argument("--out", required=True, help="destination folder (written atomically)")
    p.add_argument("--quant", default="int4", choices=["int8", "int4"])
    p.add_argument("--group-size", type=int, default=128)
    p.set_defaults(func=cmd_quantize)


def _add_bench(sub):
    p = sub.add_parser("bench", help="benchmarks: every kernel against its baselines, in one run")
    p.add_argument("--op", action="append", help="op(s) to run (repeat or comma-separate); default: all")
    p.add_argument("--quick", action="store_true", help="small shape set, under two minutes in total")
    p.add_argument("--out", default=None, help="output folder (default bench/results/<UTC date_time>)")
    p.set_defaults(func=cmd_bench)


def train_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``nvlm train`` (also ``python -m nvlm.train``)."""
    p.add_argument("--out", default=None, help="checkpoint folder, replaced if it exists "
                                               "(default: nvlm/assets/nvlm-d-small)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", default=None, help="steps per stage, e.g. '0a=1000,0b=800,1=200,2=1200'")
    p.add_argument("--no-tile-tags", action="store_true", help="tile-tag ablation: images without <tile_k> tags")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (results are reproducible for a "
                                                          "given count; default 1)")


def eval_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``nvlm eval`` (also ``python -m nvlm.evaluate``)."""
    p.add_argument("--model", default=None, help="checkpoint folder (default: the shipped small model)")
    p.add_argument("--quant", default="bf16", choices=["bf16", "int8", "int4", "bnb-nf4"])
    p.add_argument("--n", type=int, default=400, help="held-out image samples")
    p.add_argument("--n-text", type=int, default=200, help="held-out text-only samples")
    p.add_argument("--sqnr-samples", type=int, default=64, help="image samples for the logits SQNR (0: skip)")
    p.add_argument("--no-tile-tags", action="store_true", help="prompt images without <tile_k> tags (for a "
                                                                 "checkpoint of the tile-tag ablation)")
    p.add_argument("--blank", default=None, choices=["thumbnail", "tiles"],
                   help="score the image questions with each image's thumbnail (or regular tiles) blanked: which "
                        "part of the image the model answers from")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: fastest on a shared machine)")


def _add_train(sub):
    p = sub.add_parser("train", help="train the small NVLM-D shipped as the demo default (stages 0a, 0b, 1, 2)")
    train_arguments(p)
    p.set_defaults(func=cmd_train)


def _add_eval(sub):
    p = sub.add_parser("eval", help="accuracy of a checkpoint on the held-out synthetic sets (bf16 or quantised)")
    eval_arguments(p)
    p.set_defaults(func=cmd_eval)


def build_parser():
    parser = argparse.ArgumentParser(prog="nvlm", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_chat, _add_demo, _add_plan, _add_quantize, _add_bench, _add_train, _add_eval):
        add(sub)
    return parser


# ----------------------------------------------------------------------------------------------------------------
def _quant_config(name, group_size=128):
    """CLI name -> what ``NVLM.from_pretrained(quantization=...)`` takes (a name, or a config for a custom group)."""
    if name in (None, "none", "bf16"):
        return None
    if name == "int4" and group_size != 128:
        from nvlm.quant import Int4WeightOnly

        return Int4WeightOnly(group_size=group_size)
    return name


def _dtype(name):
    import torch

    return None if name is None else getattr(torch, name)


class _TextStreamer:
    """``generate`` callback that prints the reply as it grows. A byte-level BPE token can end inside a UTF-8
    character, so it decodes the whole reply so far and prints only the new, complete part."""

    def __init__(self, processor):
        self.processor = processor
        self.stops = set(processor.stop_token_ids)
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, tokens):
        token = int(tokens[0])
        if token in self.stops:
            return
        self.ids.append(token)
        text = self.processor.decode(self.ids)
        if text.endswith("\ufffd"):          # an incomplete character: wait for the next token
            return
        print(text[len(self.printed):], end="", flush=True)
        self.printed = text


def cmd_chat(args):
    import torch

    from nvlm.model import NVLM

    torch.manual_seed(args.seed)
    rank = 0
    if args.tp != 1:       # every rank loads its slices and runs the same generation; rank 0 prints
        from nvlm.tp import init_tp

        rank, world = init_tp(args.device)
        if world != args.tp:
            raise ValueError(f"--tp {args.tp} but torchrun started {world} processes (--nproc-per-node)")
    model = NVLM.from_pretrained(args.model, dtype=_dtype(args.dtype), device=args.device,
                                 quantization=_quant_config(args.quant), tp_size=args.tp, progress=rank == 0)
    images = args.image or None
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
               temperature=args.temperature or 1.0, top_p=args.top_p, top_k=args.top_k)
    if rank == 0:
        gen["callback"] = _TextStreamer(model.processor)
    model.chat(images, args.question, **gen)
    if rank == 0:
        print(flush=True)
    if args.tp != 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def cmd_plan(args):
    import json

    from nvlm.plan import format_plan, plan

    p = plan(args.model, quant=args.quant, gpu=args.gpu, context=args.context, batch=args.batch,
             group_size=args.group_size, **({"tp": args.tp} if args.tp is not None else {}))
    print(json.dumps(p.to_dict(), indent=2) if args.json else format_plan(p))
    return 0


def cmd_quantize(args):
    from nvlm.model import NVLM

    t0 = time.perf_counter()
    model = NVLM.from_pretrained(args.model, quantization=_quant_config(args.quant, args.group_size))
    model.save_pretrained(args.out)
    print(f"nvlm: wrote {args.quant} checkpoint to {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_bench(args):
    import os

    # bench/ lives at the top of the source checkout (one file per op, runnable by pytest too), not inside the
    # installed packages: `nvlm bench` finds it next to the nvlm package of an editable install.
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(checkout, "bench", "run.py")):
        raise RuntimeError("benchmarks live in the source checkout (bench/); run `nvlm bench` from an editable "
                           "install (`make demo` sets one up)")
    if checkout not in sys.path:
        sys.path.insert(0, checkout)
    from bench.run import main as bench_main

    argv = [f"--op={op}" for op in args.op or []] + (["--quick"] if args.quick else [])
    return bench_main(argv + (["--out", args.out] if args.out else []))


def cmd_demo(args):
    from nvlm.demo import run_demo

    return run_demo(model_path=args.model, image=args.image, question=args.question, quant=args.quant,
                    max_new_tokens=args.max_new_tokens)


def cmd_train(args):
    from nvlm.train import run

    return run(args)


def cmd_eval(args):
    from nvlm.evaluate import run

    return run(args)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("nvlm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for users; the whole story with --debug
        if args.debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__    # one line, whatever the exception holds
        print(f"nvlm: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

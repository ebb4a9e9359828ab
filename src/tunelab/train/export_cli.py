"""``tunelab export RUN --merge OUT`` or ``--gguf TYPE --out FILE.gguf`` — thin wrappers over
:func:`tunelab.train.export.merge_export` and :func:`tunelab.export.gguf_export.export_gguf`."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add the ``export`` sub-command."""
    parser = subparsers.add_parser(
        "export", help="write a run as a plain Hugging Face folder (LoRA merged) or a GGUF file",
        description="Merge a run's adapter into its base model and write either a folder that "
                    "AutoModelForCausalLM.from_pretrained loads on its own, or one GGUF file for "
                    "llama.cpp / Ollama / LM Studio (tokenizer and chat template included). Probe prompts "
                    "run through the source and the result; an export that answers differently is refused.",
    )
    parser.add_argument("run", help="run folder (or any model spec)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--merge", metavar="OUT", help="destination folder (Hugging Face format)")
    target.add_argument("--gguf", metavar="TYPE", choices=["f32", "f16", "bf16", "q8_0", "q5_0", "q4_0", "q4_1"],
                        help="write a GGUF file of this type (f32 f16 bf16 q8_0 q5_0 q4_0 q4_1) to --out")
    parser.add_argument("--out", metavar="FILE.gguf", help="with --gguf: the file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="--merge: cast the saved weights")
    parser.add_argument("--probe-tokens", type=int, default=32, metavar="N",
                        help="greedy tokens per probe prompt in the export check (default 32)")
    parser.add_argument("--no-check", action="store_true", help="skip the export check (not recommended)")
    parser.add_argument("--llamacpp", choices=["auto", "require", "off"], default="auto",
                        help="--gguf: also check in real llama.cpp (node-llama-cpp): auto = where installed")
    parser.add_argument("--force", action="store_true", help="keep the result even when the check fails")
    parser.add_argument("--allow-identical", action="store_true",
                        help="export an adapter that does not change the base model's answers")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tunelab.errors import TunelabError

    from tunelab.vision.compose import is_vision_run

    if is_vision_run(args.run):  # tower + projector + LLM: a transformers Llava folder where it maps onto one
        from tunelab.vision.export import export_llava

        if not args.merge:
            raise TunelabError(f"{args.run}: a vision-language run exports with --merge OUT (a Llava folder), "
                               "not as GGUF")
        out = export_llava(args.run, args.merge, overwrite=args.overwrite, check=not args.no_check)
        print(f"Llava model written to {out} (LlavaForConditionalGeneration + AutoProcessor load it)")
        return 0
    common = dict(check=not args.no_check, probe_tokens=args.probe_tokens, force=args.force,
                  allow_identical=args.allow_identical)
    if args.gguf:
        from tunelab.export.gguf_export import export_gguf

        if not args.out:
            raise TunelabError("--gguf needs --out FILE.gguf")
        if args.dtype:
            raise TunelabError("--dtype applies to --merge; --gguf TYPE sets the GGUF precision")
        report = export_gguf(args.run, args.out, args.gguf, overwrite=args.overwrite, llamacpp=args.llamacpp,
                             **common)
        print(f"GGUF written to {args.out} (check report: {args.out}.check.json)"
              + ("" if report["ok"] else " — CHECK FAILED, kept because of --force"))
        return 0
    if args.out:
        raise TunelabError("--out goes with --gguf; --merge takes the destination folder itself")
    from tunelab.train.export import merge_export

    out = merge_export(args.run, args.merge, overwrite=args.overwrite, dtype=args.dtype, **common)
    print(f"merged model written to {out}")
    return 0

"""The command table: `chatsmith <stage> [--flags]` → `module.function(cfg)`.

Each stage's flags come from its config dataclass (config.py); `chatsmith <stage> --help` lists them.
Modules are imported only when their command runs, so `chatsmith --help` is instant.
"""

from __future__ import annotations

import importlib
import sys

from .common import UserError, log

# command -> (module, function, config class as "module:Name", one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "tokenizer train": ("chatsmith.tokenizer", "train_main", "chatsmith.config:TokenizerStage",
                        "train the byte-level BPE tokenizer on the run's documents"),
    "tokenizer eval": ("chatsmith.tokenizer_eval", "main", "chatsmith.tokenizer_eval:EvalStage",
                       "bytes/token on held-out English and Chinese, beside GPT-2, cl100k and o200k"),
    "data prepare": ("chatsmith.data.shards", "main", "chatsmith.config:DataStage",
                     "tokenize the run's documents into token shards (parallel, resumable)"),
    "pretrain": ("chatsmith.train", "main", "chatsmith.config:PretrainStage",
                 "pretrain the base model on the run's token shards"),
    "sft": ("chatsmith.sft", "main", "chatsmith.sft:SFTStage",
            "chat fine-tuning of the run's base model (assistant-only loss), then reply checks"),
    "rl": ("chatsmith.rl", "main", "chatsmith.rl:RLStage",
           "GRPO on verifiable rewards from the run's chat model, calculator calls inside the rollouts"),
    "checks": ("chatsmith.checks", "main", "chatsmith.checks:ChecksStage",
               "held-out assistant checks of a run's chat model (ends its turn, Chinese in Chinese, identity, "
               "arithmetic), with 95 % intervals; --stage auto|chat|rl"),
    "chat": ("chatsmith.cli", "main", "chatsmith.cli:ChatStage",
             "talk to the run's chat model in the terminal (streamed, with tools); -p PROMPT for one shot"),
    "serve": ("chatsmith.server", "main", "chatsmith.server:ServeStage",
              "OpenAI-compatible API (+ SSE) and the web UI on the newest chat model; default http://127.0.0.1:8000"),
    "eval": ("chatsmith.evaluate", "main", "chatsmith.evaluate:EvalStage",
             "bits per byte and benchmark accuracies (with 95 % intervals) of the run's base or chat model"),
    "bench train": ("chatsmith.bench.train", "main", "chatsmith.bench.train:TrainBench",
                    "training tokens/s and MFU beside HF transformers, JSON out"),
    "bench quality": ("chatsmith.bench.quality", "main", "chatsmith.bench.quality:QualityBench",
                      "wall time and tokens to a target val bpb: chatsmith's recipe beside HF transformers + AdamW "
                      "(its lr swept), JSON out"),
    "bench data": ("chatsmith.bench.data", "main", "chatsmith.bench.data:DataBench",
                   "data prepare throughput in MB/s, JSON out"),
    "bench decode": ("chatsmith.bench.decode", "main", "chatsmith.bench.decode:DecodeBench",
                     "greedy decode tokens/s beside HF transformers generate, and 8 sequences batched, JSON out"),
    "bench gpu": ("chatsmith.bench.gpu", "main", "chatsmith.bench.gpu:GpuBench",
                  "the prepared device check: CUDA tests, a short gpu-d12 training run (tokens/s, MFU, peak memory), "
                  "bench decode; JSON out"),
    "bench serve": ("chatsmith.bench.serve", "main", "chatsmith.bench.serve:ServeBench",
                    "server load test on loopback: errors, p50/p95 latency, batched vs sequential tokens/s, JSON out"),
    "report": ("chatsmith.report", "main", "chatsmith.report:ReportStage",
               "the run's report card: report.md + PNG plots from its metrics, evals and configs; report [RUN]"),
    "export hf": ("chatsmith.interop", "export_hf_main", "chatsmith.interop:ExportHFStage",
                  "write an HF transformers directory (Qwen3ForCausalLM, tokenizer, chat template, card); [CKPT] OUT"),
    "export gguf": ("chatsmith.interop", "export_gguf_main", "chatsmith.interop_gguf:ExportGGUFStage",
                    "write a GGUF file for llama.cpp and Ollama (--dtype f32|f16|bf16|q8_0, --ollama); [CKPT] OUT"),
    "import hf": ("chatsmith.interop", "import_hf_main", "chatsmith.interop:ImportHFStage",
                  "turn a local HF Qwen3 directory into a run for chat, serve, sft and eval; DIR [--run NAME]"),
    "scale run": ("chatsmith.scaling", "main", "chatsmith.scaling:ScaleStage",
                  "scaling ladder -> law fit -> prediction.json written before the target trains -> verify "
                  "(resumable)"),
    "scale predict": ("chatsmith.scaling", "predict_main", "chatsmith.scaling:PredictStage",
                      "the run's fitted scaling law at --params N, with its interval and how far it extrapolates"),
    "speedrun": ("chatsmith.speedrun", "main", "chatsmith.config:SpeedrunStage",
                 "run every stage in order: tokenizer, data, pretrain, sft, samples"),
}


def _resolve(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def groups() -> set[str]:
    """First words of the two-word commands ("bench", "tokenizer", ...)."""
    return {name.split()[0] for name in COMMANDS if " " in name}


def usage(group: str = "") -> str:
    """The command list; with `group`, only that group's commands ("chatsmith bench" alone or with --help)."""
    names = [name for name in COMMANDS if not group or name.split()[0] == group]
    width = max(len(c) for c in names)
    prog = f"chatsmith {group}".strip()
    lines = [f"usage: {prog} <command> [--flags]   (chatsmith <command> --help for its flags)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {COMMANDS[name][3]}" for name in names]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        from . import __version__

        print(f"chatsmith {__version__}")
        return 0
    for words in (2, 1):
        name = " ".join(argv[:words])
        if len(argv) >= words and name in COMMANDS:
            rest = argv[words:]
            break
    else:
        if argv[0] in groups() and (len(argv) == 1 or argv[1] in ("-h", "--help")):
            print(usage(argv[0]))  # a group word alone lists its commands
            return 0
        group = argv[0] if argv[0] in groups() else ""
        print(f"chatsmith: unknown command {' '.join(argv[:2])!r}\n\n{usage(group)}", file=sys.stderr)
        return 2
    module, func, stage, help_text = COMMANDS[name]
    from . import config

    try:
        stage_cls = _resolve(stage)
        cfg = config.parse(stage_cls, rest, prog=f"chatsmith {name}", description=help_text)
        result = getattr(importlib.import_module(module), func)(cfg)
    except UserError as e:
        log(f"chatsmith {name}: error: {e}")  # under torchrun every rank meets it: rank 0 says it
        return 2
    except KeyboardInterrupt:
        log(f"chatsmith {name}: interrupted; rerun the same command to resume")
        return 130
    finally:
        if "torch.distributed" in sys.modules:  # under torchrun: leave the process group cleanly
            from .distributed import shutdown

            shutdown()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())

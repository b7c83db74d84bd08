"""Into the ecosystem: export a chatsmith model as an HF transformers directory or a GGUF file, import HF Qwen3.

    chatsmith export hf [CKPT] OUT               # config.json (Qwen3ForCausalLM), model.safetensors, tokenizer, card
    chatsmith export gguf [CKPT] OUT.gguf --dtype q8_0 --ollama   # llama.cpp / Ollama (interop_gguf.py)
    chatsmith import hf DIR --run NAME           # a local Qwen3 checkpoint becomes a run: chat, serve, sft, eval

CKPT is a checkpoint directory (`.../step_N`), a run name or a run directory; without it, the newest chat model of
the newest run (as `chatsmith chat` picks it). Tests: tests/test_interop.py (transformers as the reference),
tests/test_interop_gguf.py (gguf's reader; llama.cpp through llama-cpp-python, marked slow).

Notable choices:
- Our model is Qwen3 parameter for parameter (model.py), so the HF export is a rename (`GPT.to_hf_state_dict`) and
  `config.json` is `GPT.hf_config_dict()` with the token ids; no transformers import is needed to write it, and the
  keys are those 4.5x and 5.x both read (`rope_theta` and 5.x's `rope_parameters`). A tied head is left out of the
  safetensors (HF ties it back). Shards above `--max-shard-mb`, with `model.safetensors.index.json`, as HF writes.
- The tokenizer is the run's tokenizer.json as it is; tokenizer_config.json carries the one chat template's Jinja twin
  (`tokenizer.CHAT_TEMPLATE`, parity-tested against the Python renderer), bos `<|endoftext|>`, eos `<|im_end|>`
  (a chat model; `<|endoftext|>` for a base model), pad `<|endoftext|>`, and `add_bos_token` false: the template
  writes the BOS itself. generation_config.json holds chatsmith's sampling defaults (sampling.CHAT_DEFAULTS).
- Research flags: a ModelConfig field declared with metadata `research=True` has no Qwen3 counterpart; export
  refuses a model whose value differs from the default, naming the flag (`check_exportable`).
- Import reads config.json, refuses anything that is not a plain Qwen3ForCausalLM (biases, sliding window, RoPE
  scaling, other activations) in one sentence naming what, builds the model on the meta device, allocates it once
  and copies each tensor in from `safe_open` (memory-mapped, one tensor at a time): never two full copies. Weights
  become fp32 (chatsmith's master precision). The run gets the source's tokenizer.json (tokenizer.py loads a ChatML
  byte-level BPE whose specials sit anywhere) and a base checkpoint; a source with a chat template (or `--stage
  chat`) also gets the same files hard-linked as its chat checkpoint. `chatsmith sft` starts from a base model and
  refuses a run that already has chat checkpoints: import with `--stage base` to fine-tune. Chats are rendered by
  chatsmith's ChatML renderer (BOS first, no `<think>` blocks), which is not byte-identical to Qwen3's own template.
- `hf:ORG/NAME` sources go through huggingface_hub's snapshot_download (online only); offline it is one sentence.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import MANIFEST_FILE, LoadConfig, LoadedModel, load_model
from .common import UserError, atomic_write_json, atomic_write_text, log, progress, run_dir, runs_root
from .config import opt

HF_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
SAFETENSORS_INDEX = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------------------------------
# configs


@dataclass(frozen=True)
class ExportConfig:
    source: str = opt("", "CKPT: a checkpoint directory (step_N), a run name or a run directory; default: the newest "
                          "chat model of the newest run", positional=True)
    out: str = opt("", "OUT: the directory (hf) or .gguf file (gguf) to write", positional=True)
    force: bool = opt(False, "replace OUT if it exists")


@dataclass(frozen=True)
class HFExportConfig:
    dtype: str = opt("fp32", "weight dtype of model.safetensors", choices=tuple(HF_DTYPES))
    max_shard_mb: int = opt(4000, "split model.safetensors into shards of at most this many MB (with an index)",
                            min=1, max=10**7)


@dataclass(frozen=True)
class ExportHFStage:
    export: ExportConfig = ExportConfig()
    hf: HFExportConfig = HFExportConfig()


@dataclass(frozen=True)
class ImportConfig:
    source: str = opt("", "DIR: a local Hugging Face Qwen3 directory (config.json, *.safetensors, tokenizer.json), "
                          "or hf:ORG/NAME to download one (online only)", positional=True)
    run: str = opt("", "name of the new run; default: the directory's name")
    stage: str = opt("auto", "chat: a chat model (chat, serve) and the same files as its base model; base: a base "
                             "model only, the start for `chatsmith sft`; auto: chat when the source has a chat "
                             "template", choices=("auto", "chat", "base"))
    seq_len: int = opt(0, "context length of the run; 0 = the model's max_position_embeddings, at most 4096",
                       min=0, max=2**20)
    force: bool = opt(False, "replace the run's imported checkpoint if it exists")


@dataclass(frozen=True)
class ImportHFStage:
    imports: ImportConfig = ImportConfig()


# ---------------------------------------------------------------------------------------------------------------------
# which model


def load_source(source: str) -> LoadedModel:
    """The model `source` names (see the module docstring), in fp32 on the CPU."""
    base = dict(device="cpu", precision="fp32", threads=0)
    if not source:
        return load_model(LoadConfig(**base), stage="chat")
    path = Path(source).expanduser()
    if path.is_dir() and (path / MANIFEST_FILE).is_file():
        return load_model(LoadConfig(checkpoint=str(path), **base), stage="chat")
    if path.is_dir() and path.resolve().parent == runs_root().resolve():
        return load_model(LoadConfig(run=path.name, **base), stage="chat")
    if "/" not in source and run_dir(source, create=False).is_dir():
        return load_model(LoadConfig(run=source, **base), stage="chat")
    raise UserError(f"{source!r} is neither a checkpoint directory (step_N with {MANIFEST_FILE}) nor a run under "
                    f"{runs_root()}; pass one of those, or nothing for the newest chat model")


def research_flags(cfg: Any) -> list[tuple[str, Any]]:
    """(field, value) of every research flag of a model config that is set: a field declared with metadata
    `research=True` whose value differs from its default."""
    found = []
    for f in dataclasses.fields(cfg):
        if f.metadata.get("research") and getattr(cfg, f.name) != f.default:
            found.append((f.name, getattr(cfg, f.name)))
    return found


def check_exportable(cfg: Any) -> None:
    """UserError when the model uses a feature Qwen3 runtimes do not have (see `research_flags`)."""
    flags = research_flags(cfg)
    if flags:
        named = ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in flags)
        raise UserError(f"this model was trained with {named}, a research feature that Qwen3 runtimes "
                        f"(transformers, llama.cpp, Ollama) do not have, so it cannot be exported")


def chat_token_ids(tokenizer: Any, is_chat: bool) -> dict[str, int]:
    """bos, eos and pad ids of an export: eos is `<|im_end|>` for a chat model, `<|endoftext|>` for a base one."""
    bos = tokenizer.bos_id
    eos = tokenizer.special_id("<|im_end|>") if is_chat else bos
    return {"bos": bos, "eos": eos, "pad": bos}


def check_out(out: str, force: bool, kind: str) -> Path:
    """The output path, checked before any work: named, and new unless --force (the old one is replaced only once
    the new one is complete)."""
    if not out:
        raise UserError(f"name the output: chatsmith export {kind} [CKPT] OUT")
    path = Path(out).expanduser()
    if path.exists() and (path.is_file() or any(path.iterdir())) and not force:
        raise UserError(f"{path} already exists; pass --force to replace it or choose another OUT")
    return path


def split_positionals(cfg: ExportConfig) -> tuple[str, str]:
    """(CKPT, OUT): with one positional word it is OUT."""
    if cfg.source and not cfg.out:
        return "", cfg.source
    return cfg.source, cfg.out


# ---------------------------------------------------------------------------------------------------------------------
# export hf


def hf_config(model: Any, ids: dict[str, int], dtype: str) -> dict:
    """config.json of a Qwen3ForCausalLM equal to `model`."""
    cfg = model.hf_config_dict()
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **cfg,
            "rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": cfg["rope_theta"]},
            "max_window_layers": cfg["num_hidden_layers"], "sliding_window": None, "initializer_range": 0.02,
            "use_cache": True, "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"],
            "torch_dtype": HF_DTYPES[dtype]}


def generation_config(ids: dict[str, int], is_chat: bool) -> dict:
    from .sampling import CHAT_DEFAULTS

    eos = [ids["eos"], ids["bos"]] if is_chat else ids["eos"]
    return {"bos_token_id": ids["bos"], "eos_token_id": eos, "pad_token_id": ids["pad"], "do_sample": True,
            "temperature": CHAT_DEFAULTS.temperature, "top_k": CHAT_DEFAULTS.top_k, "top_p": CHAT_DEFAULTS.top_p,
            "repetition_penalty": CHAT_DEFAULTS.repetition_penalty, "max_new_tokens": CHAT_DEFAULTS.max_tokens}


def tokenizer_config(tokenizer: Any, is_chat: bool, seq_len: int) -> dict:
    from .tokenizer import CHAT_TEMPLATE

    names = {k: tokenizer.id_bytes(i).decode("utf-8") for k, i in chat_token_ids(tokenizer, is_chat).items()}
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": names["bos"], "eos_token": names["eos"],
            "pad_token": names["pad"], "unk_token": None, "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False, "model_max_length": seq_len, "chat_template": CHAT_TEMPLATE}


def write_safetensors(sd: dict[str, Any], out: Path, max_shard_bytes: int) -> list[Path]:
    """`sd` into out/model.safetensors, or shards model-0000i-of-0000n.safetensors + the index above the limit."""
    from safetensors.torch import save_file

    shards: list[dict[str, Any]] = [{}]
    size = 0
    for name, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return [out / "model.safetensors"]
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        file = out / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(file), metadata={"format": "pt"})
        files.append(file)
        weight_map.update(dict.fromkeys(shard, file.name))
    total = sum(t.numel() * t.element_size() for t in sd.values())
    atomic_write_json(out / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return files


def export_hf(loaded: LoadedModel, out: Path, dtype: str = "fp32", max_shard_bytes: int = 4 * 10**9) -> Path:
    """Write the HF transformers directory `out` for `loaded` (see the module docstring); returns `out`."""
    import torch

    model, tok = loaded.model, loaded.tokenizer
    check_exportable(model.config)
    ids = chat_token_ids(tok, loaded.is_chat)
    torch_dtype = getattr(torch, HF_DTYPES[dtype])
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        sd = {k: v.detach().to(torch_dtype).contiguous() for k, v in model.to_hf_state_dict(include_tied=False).items()}
        write_safetensors(sd, tmp, max_shard_bytes)
        atomic_write_json(tmp / "config.json", hf_config(model, ids, dtype))
        atomic_write_json(tmp / "generation_config.json", generation_config(ids, loaded.is_chat))
        shutil.copyfile(loaded.run / "tokenizer" / "tokenizer.json", tmp / "tokenizer.json")
        atomic_write_json(tmp / "tokenizer_config.json", tokenizer_config(tok, loaded.is_chat, model.config.seq_len))
        atomic_write_json(tmp / "special_tokens_map.json", {k + "_token": tok.id_bytes(i).decode("utf-8")
                                                             for k, i in ids.items()})
        atomic_write_text(tmp / "README.md", model_card(loaded, out.name))
        if out.is_dir() and any(out.iterdir()):
            shutil.rmtree(out)  # the caller allowed it (--force); the new directory is complete
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------------------------------------------------------
# model card


def last_metric(path: Path, kind: str, key: str) -> Any:
    """The last value of `key` in lines of `kind` of a metrics.jsonl, or None."""
    value = None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("kind") == kind and rec.get(key) is not None:
            value = rec[key]
    return value


def _num(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else "—"


def model_card(loaded: LoadedModel, name: str) -> str:
    """README.md of an export: what the model is, its shape, its numbers (the newest eval result of each stage, as
    evaluate.markdown_table writes it; the last validation bits per byte of pretraining and SFT), how to run it."""
    from .evaluate import load_results, markdown_table

    cfg, run = loaded.model.config, loaded.run
    meta = json.loads((loaded.checkpoint / "meta.json").read_text(encoding="utf-8"))
    kind = "chat model" if loaded.is_chat else "base (pretrained) model"
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [chatsmith, qwen3]",
             "language: [en, zh]", "---", "", f"# {name}", "",
             (f"A {kind} imported into chatsmith from `{meta['imported_from'].get('source')}`"
              if meta.get("imported_from") else f"A {kind} trained with chatsmith")
             + f": run `{run.name}`, checkpoint `{loaded.checkpoint.name}` "
             f"(step {meta.get('step', '?')}), git `{meta.get('git') or 'unknown'}`. Architecture: Qwen3 "
             f"(`Qwen3ForCausalLM`), {loaded.model.num_params():,} parameters.", "",
             "| depth | width | heads (kv) | head dim | MLP | vocab | context | tied |",
             "|---|---|---|---|---|---|---|---|",
             f"| {cfg.depth} | {cfg.n_embd} | {cfg.n_head} ({cfg.n_kv_head}) | {cfg.head_dim} | "
             f"{cfg.intermediate_size} | {cfg.vocab_size} | {cfg.seq_len} | {cfg.tie_embeddings} |", "",
             "## Evaluation", ""]
    newest = {r.get("stage"): r for r in load_results(run)}  # oldest first: the newest result of each stage wins
    if not newest:
        lines += ["Not evaluated (the run has no `eval/` results; `chatsmith eval` writes them).", ""]
    for result in newest.values():
        lines += [markdown_table(result)]
    lines += ["## Training", ""]
    pre = last_metric(run / "metrics.jsonl", "val", "val_bpb")
    sft = last_metric(run / "chat" / "metrics.jsonl", "val", "val_bpb")
    tokens = meta.get("tokens") or meta.get("tokens_seen")
    facts = [f"pretraining val bits/byte {_num(pre)}" if pre is not None else "no pretraining metrics",
             f"SFT val bits/byte {_num(sft)}" if sft is not None else "no SFT metrics"]
    if tokens:
        facts.append(f"{tokens:,} tokens seen" if isinstance(tokens, int) else f"tokens seen: {tokens}")
    lines += ["; ".join(facts) + ".", "", "## Use", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f'tok = AutoTokenizer.from_pretrained("{name}")',
              f'model = AutoModelForCausalLM.from_pretrained("{name}")',
              'ids = tok.apply_chat_template([{"role": "user", "content": "Hi!"}], add_generation_prompt=True,',
              '                              return_tensors="pt", return_dict=True)',
              "out = model.generate(**ids, max_new_tokens=64)",
              'print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))', "```", "",
              "Chat format: ChatML, BOS `<|endoftext|>` first (written by the chat template; the tokenizer adds "
              "none), generation ends at `<|im_end|>`.", ""]
    return "\n".join(lines)


def export_hf_main(cfg: ExportHFStage) -> None:
    source, out = split_positionals(cfg.export)
    path = check_out(out, cfg.export.force, "hf")
    loaded = load_source(source)
    export_hf(loaded, path, cfg.hf.dtype, cfg.hf.max_shard_mb * 10**6)
    log(f"export hf: wrote {path} ({'chat' if loaded.is_chat else 'base'} model {loaded.run.name}/"
        f"{loaded.checkpoint.name}); load it with AutoModelForCausalLM.from_pretrained({str(path)!r})")


def export_gguf_main(cfg: Any) -> None:  # cfg: interop_gguf.ExportGGUFStage
    from .interop_gguf import export_gguf, write_modelfile

    source, out = split_positionals(cfg.export)
    path = check_out(out, cfg.export.force, "gguf")
    if path.suffix != ".gguf":
        raise UserError(f"name the GGUF file with a .gguf suffix, not {path.name!r}")
    loaded = load_source(source)
    export_gguf(loaded, path, cfg.gguf.dtype)
    log(f"export gguf: wrote {path} ({cfg.gguf.dtype}); run it with llama.cpp: llama-cli -m {path}")
    if cfg.gguf.ollama:
        modelfile = write_modelfile(loaded, path)
        name = loaded.run.name.lower()
        print(f"ollama create {name} -f {modelfile}\nollama run {name}")


# ---------------------------------------------------------------------------------------------------------------------
# import hf


def _unsupported(cfg: dict) -> str | None:
    """What a config.json holds that chatsmith's Qwen3 does not (None when it is supported)."""
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "qwen3" or (archs and archs != ["Qwen3ForCausalLM"]):
        return f"the architecture {', '.join(archs) or cfg.get('model_type')!s} (only Qwen3ForCausalLM is)"
    if cfg.get("attention_bias"):
        return "attention biases (attention_bias: true)"
    if cfg.get("use_sliding_window"):
        return "sliding-window attention (use_sliding_window: true)"
    if cfg.get("hidden_act", "silu") != "silu":
        return f"the activation {cfg['hidden_act']!r} (only silu is)"
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r}"
    return None


def hf_model_config(cfg: dict, seq_len: int = 0):
    """The chatsmith ModelConfig of a Qwen3 config.json (UserError naming what is unsupported)."""
    from .model import ModelConfig

    problem = _unsupported(cfg)
    if problem:
        raise UserError(f"chatsmith cannot import this model: it does not support {problem}")
    heads = cfg["num_attention_heads"]
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    return ModelConfig(depth=cfg["num_hidden_layers"], n_embd=cfg["hidden_size"],
                       head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, n_head=heads,
                       n_kv_head=cfg.get("num_key_value_heads") or heads, intermediate_size=cfg["intermediate_size"],
                       vocab_size=cfg["vocab_size"], seq_len=seq_len or min(cfg.get("max_position_embeddings", 4096),
                                                                             4096),
                       rope_theta=float(theta), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                       tie_embeddings=bool(cfg.get("tie_word_embeddings", False))).resolve()


def resolve_hf_source(source: str) -> Path:
    """A local directory for `source`: itself, or for hf:ORG/NAME a hub download (online only)."""
    if source.startswith("hf:"):
        repo = source[3:]
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise UserError("hf: names need huggingface_hub; pip install huggingface_hub, or pass a local "
                            "directory") from None
        try:
            return Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"]))
        except Exception as e:  # offline, unknown repo, gated: the hub raises many kinds
            raise UserError(f"could not download {repo} from the Hugging Face hub ({type(e).__name__}); check the "
                            f"name and the network, or pass a local directory") from None
    path = Path(source).expanduser()
    if not source or not path.is_dir():
        raise UserError(f"{source!r} is not a directory; pass a local Qwen3 directory or hf:ORG/NAME")
    return path


def safetensors_files(src: Path) -> list[Path]:
    index = src / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [src / f for f in sorted(set(weight_map.values()))]
    if (src / "model.safetensors").is_file():
        return [src / "model.safetensors"]
    raise UserError(f"{src} holds no model.safetensors nor {SAFETENSORS_INDEX}; chatsmith imports safetensors "
                    f"weights only (convert .bin files with transformers' save_pretrained)")


def load_hf_weights(model: Any, files: list[Path]) -> None:
    """Copy each tensor of `files` (HF names) into `model` (allocated, chatsmith names), one at a time."""
    import torch
    from safetensors import safe_open

    ours = {model.hf_name(k): v for k, v in model.state_dict().items()}
    seen = set()
    for file in progress(files, desc="import", unit="file"):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name == "lm_head.weight" and model.config.tie_embeddings:
                    continue  # some tied checkpoints store the head too: it is the embedding
                if name not in ours:
                    raise UserError(f"{file.name} holds {name}, which a plain Qwen3 model has not; chatsmith cannot "
                                    f"import it")
                t = f.get_tensor(name)
                if t.shape != ours[name].shape:
                    raise UserError(f"{name} has shape {tuple(t.shape)} but config.json implies "
                                    f"{tuple(ours[name].shape)}; the directory is inconsistent")
                with torch.no_grad():
                    ours[name].copy_(t)
                seen.add(name)
    missing = sorted(set(ours) - seen)
    if missing:
        raise UserError(f"the checkpoint lacks {len(missing)} weights, e.g. {missing[0]}; is it a complete Qwen3 "
                        f"model?")


def import_hf(source: str, run_name: str = "", seq_len: int = 0, force: bool = False, stage: str = "auto") -> Path:
    """Turn a local Qwen3 directory into a chatsmith run (see the module docstring); returns the run directory."""
    import torch

    from . import checkpoint
    from .model import GPT, rope_tables
    from .tokenizer import Tokenizer

    src = resolve_hf_source(source)
    try:
        hf_cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{src / 'config.json'} is missing or unreadable ({type(e).__name__}); is {src} an HF model "
                        f"directory?") from None
    mcfg = hf_model_config(hf_cfg, seq_len)
    if not (src / "tokenizer.json").is_file():
        raise UserError(f"{src} has no tokenizer.json; chatsmith needs the fast tokenizer file next to the weights")
    tok = Tokenizer.load(src / "tokenizer.json")
    if tok.vocab_size > mcfg.vocab_size:
        raise UserError(f"the tokenizer has {tok.vocab_size} ids but the model only {mcfg.vocab_size}")
    files = safetensors_files(src)
    tok_cfg_path = src / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text(encoding="utf-8")) if tok_cfg_path.is_file() else {}
    template = tok_cfg.get("chat_template") or ""
    if (src / "chat_template.jinja").is_file():
        template = (src / "chat_template.jinja").read_text(encoding="utf-8")
    run = run_dir(run_name or src.name.replace(".", "-"), create=False)
    base_root, chat_root = run / "checkpoints", run / "chat" / "checkpoints"
    if checkpoint.list_checkpoints(base_root) or checkpoint.list_checkpoints(chat_root):
        if not force:
            raise UserError(f"run {run.name} already has checkpoints; pass --force to replace it or choose --run")
        shutil.rmtree(run)

    with torch.device("meta"):
        model = GPT(mcfg)
    model.to_empty(device="cpu")  # the one allocation of the weights; every tensor is filled below
    cos, sin = rope_tables(mcfg.head_dim, model.rope_len, mcfg.rope_theta)
    model.rope_cos.copy_(cos)
    model.rope_sin.copy_(sin)
    load_hf_weights(model, files)

    run.mkdir(parents=True, exist_ok=True)
    tok_dir = run / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    shutil.copyfile(src / "tokenizer.json", tok_dir / "tokenizer.json")
    if tok_cfg_path.is_file():
        shutil.copyfile(tok_cfg_path, tok_dir / "tokenizer_config.json")  # the source's own template, for the record
    meta = {"config": {"model": dataclasses.asdict(mcfg)},
            "imported_from": {"source": source, "architecture": "Qwen3ForCausalLM",
                              "torch_dtype": hf_cfg.get("torch_dtype") or hf_cfg.get("dtype"),
                              "chat_template": bool(template)}}
    path = checkpoint.save(base_root, 0, model.state_dict(), meta=meta, rng=False, keep_last=0)
    as_chat = stage == "chat" or (stage == "auto" and bool(template))
    if as_chat:
        chat = chat_root / path.name
        chat.mkdir(parents=True)
        for f in path.iterdir():
            os.link(f, chat / f.name)  # the same files, no second copy on disk
        if "<|im_start|>" not in template:
            log("import hf: warning: the source's chat template is not ChatML; chatsmith renders chats in ChatML")
    atomic_write_json(run / "config.json", {"import": {"source": source, "model": dataclasses.asdict(mcfg)}})
    log(f"import hf: run {run.name} from {src} ({model.num_params():,} parameters, "
        f"{'chat and base' if as_chat else 'base'} checkpoint); talk to it: chatsmith chat --run {run.name}"
        + ("" if as_chat else f", fine-tune it: chatsmith sft --run {run.name}"))
    return run


def import_hf_main(cfg: ImportHFStage) -> None:
    c = cfg.imports
    import_hf(c.source, c.run, c.seq_len, c.force, c.stage)

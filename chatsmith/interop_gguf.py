"""GGUF export (llama.cpp, Ollama, LM Studio) written with the `gguf` package, llama.cpp's own Python writer.

    chatsmith export gguf [CKPT] OUT.gguf [--dtype f32|f16|bf16|q8_0] [--ollama]
    llama-cli -m OUT.gguf -cnv                   # llama.cpp picks up the chat template from the file
    ollama create NAME -f Modelfile              # printed by --ollama, which writes Modelfile beside OUT.gguf

Notable choices (DESIGN.md, "GGUF facts", checked against llama.cpp's qwen3 loader):
- Architecture `qwen3`; the keys come from the writer's methods (constants, no strings): context, width, blocks, FFN,
  heads, kv heads, `attention.key_length`/`value_length` (required when head_dim != width / heads), RMS eps and
  `rope.freq_base` (llama.cpp silently assumes 10000 without it).
- Tensors map 1:1 from the HF names by gguf's own `TensorNameMap` for qwen3; no q/k permutation (qwen3 is NEOX RoPE
  in llama.cpp, as in HF). A tied model writes no `output` tensor (llama.cpp then reuses `token_embd`).
  Norm weights (1-D) always stay F32, as llama.cpp's converter keeps them; q8_0 quantizes matrices whose rows are
  multiples of 32 (gguf.quants, the reference implementation) and keeps the others in f16.
- Tokenizer `gpt2` (byte-level BPE) with pre-tokenizer `qwen2` (our split regex is Qwen2's), the vocabulary as
  token strings, merges as "a b", token types (control 3 for specials, user-defined 4 for other added tokens,
  unused 5 for padding rows of a model vocabulary larger than the tokenizer's), explicit bos/eos/pad ids,
  `add_bos_token` false (the chat template writes the BOS), and the Jinja chat template.
- A custom vocabulary never matches llama.cpp's converter hash table, hence writing directly rather than running
  convert_hf_to_gguf.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import UserError, atomic_write_text
from .config import opt
from .interop import ExportConfig, chat_token_ids, check_exportable

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass(frozen=True)
class GGUFExportConfig:
    dtype: str = opt("f16", "tensor type of the matrices (norms stay f32); f32 for exact parity", choices=GGUF_DTYPES)
    ollama: bool = opt(False, "also write an Ollama Modelfile beside the .gguf and print `ollama create`")


@dataclass(frozen=True)
class ExportGGUFStage:
    export: ExportConfig = ExportConfig()
    gguf: GGUFExportConfig = GGUFExportConfig()


def _vocab(loaded: Any, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """(token strings, token types, merges "a b") from the run's tokenizer.json, padded to the model's vocab."""
    import gguf

    data = json.loads((loaded.run / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise UserError("the run's tokenizer is not a byte-level BPE, which GGUF's gpt2 tokenizer needs")
    tokens: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types = dict.fromkeys(tokens, int(gguf.TokenType.NORMAL))
    for added in data.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    if max(tokens) >= n_vocab:
        raise UserError(f"the tokenizer has ids up to {max(tokens)} but the model only {n_vocab}")
    names, kinds = [], []
    for i in range(n_vocab):
        if i in tokens:
            names.append(tokens[i])
            kinds.append(types[i])
        else:  # a padding row of the embedding: never produced by the tokenizer
            names.append(f"[PAD{i}]")
            kinds.append(int(gguf.TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return names, kinds, merges


def _tensor(name: str, t: Any, dtype: str) -> tuple[Any, Any]:
    """(numpy data, raw_dtype or None) of one tensor in the export's type."""
    import gguf
    import numpy as np
    import torch

    arr = t.detach().to(torch.float32).contiguous().numpy()
    if arr.ndim == 1 or dtype == "f32":
        return arr, None
    if dtype == "f16":
        return arr.astype(np.float16), None
    if dtype == "bf16":
        return gguf.quants.quantize(arr, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    if arr.shape[-1] % 32:  # q8_0 blocks are 32 values of a row
        return arr.astype(np.float16), None
    return gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


def export_gguf(loaded: Any, out: Path, dtype: str = "f16") -> Path:
    """Write `loaded` (checkpoint.LoadedModel) as a qwen3 GGUF file `out` (see the module docstring)."""
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF export needs the gguf package (a chatsmith dependency): pip install gguf") from None
    from .tokenizer import CHAT_TEMPLATE

    if dtype not in GGUF_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(GGUF_DTYPES)}, not {dtype!r}")
    model, cfg = loaded.model, loaded.model.config
    check_exportable(cfg)
    ids = chat_token_ids(loaded.tokenizer, loaded.is_chat)
    tokens, types, merges = _vocab(loaded, cfg.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN3])
    w.add_name(loaded.run.name)
    w.add_context_length(cfg.seq_len)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.depth)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_file_type(int(file_type))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(ids["bos"])
    w.add_eos_token_id(ids["eos"])
    w.add_pad_token_id(ids["pad"])
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, cfg.depth)
    for hf_name, t in model.to_hf_state_dict(include_tied=False).items():
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:
            raise UserError(f"no GGUF name for {hf_name}; the model is not a plain Qwen3")
        data, raw = _tensor(name, t, dtype)
        w.add_tensor(name, data, raw_dtype=raw)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
    finally:
        w.close()
    tmp.replace(out)
    return out


def ollama_template() -> str:
    """The ChatML chat template as an Ollama (Go text/template) TEMPLATE: BOS first, tool calls as
    `<tool_call>{json}</tool_call>` lines after the content, the generation prompt last (tokenizer.CHAT_TEMPLATE)."""
    return ("<|endoftext|>"
            "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
            "{{ .Content }}"
            "{{- $content := .Content }}"
            "{{- range $i, $call := .ToolCalls }}{{ if or $i $content }}\n{{ end }}"
            '<tool_call>{"name": "{{ $call.Function.Name }}", "arguments": {{ $call.Function.Arguments }}}'
            "</tool_call>{{ end }}<|im_end|>\n"
            "{{ end }}<|im_start|>assistant\n")


def write_modelfile(loaded: Any, gguf_path: Path) -> Path:
    """An Ollama Modelfile beside `gguf_path`: FROM, the ChatML TEMPLATE, the stop token and chatsmith's sampling
    defaults (sampling.CHAT_DEFAULTS); returns its path."""
    from .sampling import CHAT_DEFAULTS

    d = CHAT_DEFAULTS
    stop = "<|im_end|>" if loaded.is_chat else "<|endoftext|>"
    text = (f"# Ollama Modelfile for {loaded.run.name} ({loaded.checkpoint.name}), written by chatsmith export gguf\n"
            f"FROM ./{gguf_path.name}\n"
            f'TEMPLATE """{ollama_template()}"""\n'
            f'PARAMETER stop "{stop}"\n'
            f'PARAMETER stop "<|im_start|>"\n'
            f"PARAMETER temperature {d.temperature}\n"
            f"PARAMETER top_k {d.top_k}\n"
            f"PARAMETER top_p {d.top_p}\n"
            f"PARAMETER repeat_penalty {d.repetition_penalty}\n"
            f"PARAMETER num_predict {d.max_tokens}\n"
            f"PARAMETER num_ctx {loaded.model.config.seq_len}\n")
    path = gguf_path.with_name("Modelfile")
    atomic_write_text(path, text)
    return path

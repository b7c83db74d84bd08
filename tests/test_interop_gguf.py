"""GGUF export (chatsmith/interop_gguf.py): read back with gguf's own GGUFReader (every tensor and key, exact at f32,
dequantized within the format's error at f16/bf16/q8_0), the Ollama Modelfile, and llama.cpp itself through
llama-cpp-python (slow, skipped when it is not importable): its tokenizer gives our ids on English, Chinese, digits
and code and decodes every id to our bytes, its logits match ours (1e-3; measured ~2e-6), and its greedy
continuation of English and Chinese prompts equals ours for 16 tokens (f32 weights, F32 KV cache, logits_all).

    python -m pytest -q tests/test_interop_gguf.py             # the reader tests
    python -m pytest -q -m slow tests/test_interop_gguf.py     # llama.cpp parity

llama-cpp-python builds llama.cpp from source (`CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python`); only
its libllama is needed here, so a build stopped once `bin/libllama.so` exists also serves: point
LLAMA_CPP_LIB_PATH at that bin/ and PYTHONPATH at the sdist's root (its `llama_cpp` package; pip install diskcache).
"""

import os

import numpy as np
import pytest
import torch
from test_interop import CODE, EN, ZH, qwen_dir, save_chat_run  # noqa: F401 (qwen_dir: a fixture)

from chatsmith.__main__ import main as cli_main
from chatsmith.interop import load_source
from chatsmith.interop_gguf import export_gguf, ollama_template
from chatsmith.sampling import CHAT_DEFAULTS
from chatsmith.tokenizer import CHAT_TEMPLATE, Tokenizer

gguf = pytest.importorskip("gguf")

TEXTS = {"en": EN, "zh": ZH, "digits": "pi = 3.14159265, 2026-12-01, 1234567890 and 007\n", "code": CODE}
PROMPTS = ["The quick brown fox jumps over the", "人民日报发表新年讲话。我们今天"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    from test_interop import corpus

    return Tokenizer.train(corpus(), 500, show_progress=False)


@pytest.fixture(scope="module")
def run(tok, tmp_path_factory):
    """(loaded fp32 model, export directory): the random test_interop model, untied, as a run."""
    home = tmp_path_factory.mktemp("home")
    old = os.environ.get("CHATSMITH_HOME")
    os.environ["CHATSMITH_HOME"] = str(home)
    try:
        save_chat_run(tok, "tiny", tie=False)
        yield load_source("tiny"), tmp_path_factory.mktemp("gguf")
    finally:
        if old is None:
            os.environ.pop("CHATSMITH_HOME", None)
        else:
            os.environ["CHATSMITH_HOME"] = old


def field(reader, key: str):
    f = reader.get_field(key)
    assert f is not None, key
    return f.contents()


def test_gguf_reads_back_every_key_and_tensor(run, tok):
    loaded, out = run
    path = export_gguf(loaded, out / "f32.gguf", "f32")
    reader = gguf.GGUFReader(str(path))
    cfg = loaded.model.config
    expected = {
        "general.architecture": "qwen3", "qwen3.context_length": cfg.seq_len, "qwen3.embedding_length": 48,
        "qwen3.block_count": 2, "qwen3.feed_forward_length": 80, "qwen3.attention.head_count": 4,
        "qwen3.attention.head_count_kv": 2, "qwen3.attention.key_length": 16, "qwen3.attention.value_length": 16,
        "qwen3.rope.freq_base": 50000.0, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": tok.special_id("<|im_end|>"),
        "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE, "general.file_type": int(gguf.LlamaFileType.ALL_F32),
    }
    for key, value in expected.items():
        got = field(reader, key)
        assert (got == pytest.approx(value)) if isinstance(value, float) else got == value, key
    assert field(reader, "qwen3.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps)
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == cfg.vocab_size == tok.vocab_size
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] and types[:16] == [3] * 16
    assert set(types[16:]) == {1}
    merges = field(reader, "tokenizer.ggml.merges")
    assert len(merges) == tok.vocab_size - 16 - 256 and all(len(m.split(" ")) == 2 for m in merges)

    sd = loaded.model.to_hf_state_dict(include_tied=False)
    tensors = {t.name: t for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, 2)
    assert sorted(tensors) == sorted(names.get_name(k, try_suffixes=(".weight",)) for k in sd)
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.attn_q_norm.weight",
            "blk.0.attn_k.weight", "blk.1.ffn_down.weight"} <= set(tensors)
    for hf_name, t in sd.items():
        g = tensors[names.get_name(hf_name, try_suffixes=(".weight",))]
        assert g.tensor_type == gguf.GGMLQuantizationType.F32
        assert np.array_equal(np.asarray(g.data).reshape(t.shape), t.numpy()), hf_name  # 1:1, no q/k permutation


@pytest.mark.parametrize("dtype, qtype, tol", [("f16", "F16", 1e-3), ("bf16", "BF16", 8e-3), ("q8_0", "Q8_0", 1.2e-2)])
def test_gguf_dtypes(run, dtype, qtype, tol):
    loaded, out = run
    reader = gguf.GGUFReader(str(export_gguf(loaded, out / f"{dtype}.gguf", dtype)))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, 2)
    tensors = {t.name: t for t in reader.tensors}
    kinds = set()
    for hf_name, t in loaded.model.to_hf_state_dict(include_tied=False).items():
        g = tensors[names.get_name(hf_name, try_suffixes=(".weight",))]
        want = getattr(gguf.GGMLQuantizationType, qtype)
        if t.dim() == 1:  # norms stay f32
            want = gguf.GGMLQuantizationType.F32
        elif qtype == "Q8_0" and t.shape[1] % 32:  # q8_0 blocks hold 32 values of a row: such rows stay f16
            want = gguf.GGMLQuantizationType.F16
        assert g.tensor_type == want, hf_name
        kinds.add(g.tensor_type.name)
        back = gguf.quants.dequantize(np.asarray(g.data), g.tensor_type).reshape(t.shape)
        scale = t.abs().max().item()
        assert np.abs(back - t.numpy()).max() <= tol * scale, hf_name
    assert qtype in kinds and "F32" in kinds  # rows of 48 or 80 values stay f16, rows of 64 (o_proj) are q8_0


def test_ollama_modelfile(run, capsys):
    loaded, out = run
    target = out / "ollama" / "model.gguf"
    target.parent.mkdir()
    assert cli_main(["export", "gguf", str(loaded.checkpoint), str(target), "--dtype", "q8_0", "--ollama"]) == 0
    printed = capsys.readouterr().out
    modelfile = (target.parent / "Modelfile").read_text()
    assert f"ollama create tiny -f {target.parent / 'Modelfile'}" in printed
    assert "FROM ./model.gguf\n" in modelfile and f'TEMPLATE """{ollama_template()}"""' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    d = CHAT_DEFAULTS
    for line in (f"temperature {d.temperature}", f"top_k {d.top_k}", f"top_p {d.top_p}",
                 f"repeat_penalty {d.repetition_penalty}", f"num_ctx {loaded.model.config.seq_len}"):
        assert f"PARAMETER {line}\n" in modelfile
    assert ollama_template().startswith("<|endoftext|>") and ollama_template().endswith("<|im_start|>assistant\n")
    assert cli_main(["export", "gguf", str(loaded.checkpoint), str(out / "model.bin")]) == 2


# ---------------------------------------------------------------------------------------------------------------------
# llama.cpp (slow: llama-cpp-python builds from source)


@pytest.fixture(scope="module")
def llama(run):
    llama_cpp = pytest.importorskip("llama_cpp")
    loaded, out = run
    path = export_gguf(loaded, out / "llama.gguf", "f32")
    f32 = 0  # GGML_TYPE_F32 for the KV cache: the default f16 cache rounds keys and values
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, logits_all=True, type_k=f32, type_v=f32,
                           n_threads=2, verbose=False, seed=0)


def piece(llama, token: int) -> bytes:
    """The bytes llama.cpp decodes `token` to (llama-cpp-python's own detokenize cuts pieces at 32 bytes)."""
    import ctypes

    import llama_cpp

    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_token_to_piece(llama._model.vocab, token, buf, 256, 0, True)
    assert 0 <= n <= 256
    return buf.raw[:n]


@pytest.mark.slow
def test_llama_cpp_tokenizer_matches(llama, tok):
    for name, text in TEXTS.items():
        ids = llama.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        assert ids == tok.encode(text), name
        assert b"".join(piece(llama, i) for i in ids).decode("utf-8") == text, name
    assert [piece(llama, i) for i in range(tok.vocab_size)] == [tok.id_bytes(i) for i in range(tok.vocab_size)]
    assert llama.token_eos() == tok.special_id("<|im_end|>") and llama.token_bos() == tok.bos_id


def greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.slow
def test_llama_cpp_logits_and_greedy_16_tokens(llama, run, tok):
    loaded, _ = run
    for text in PROMPTS:
        prompt = tok.encode(text, bos=True)
        llama.reset()
        llama.eval(prompt)
        theirs_logits = torch.tensor(np.asarray(llama.scores[: len(prompt)]))
        with torch.no_grad():
            ours_logits = loaded.model(torch.tensor([prompt]))[0]
        diff = (theirs_logits - ours_logits).abs().max().item()
        print(f"llama.cpp vs chatsmith logits on {text!r}: max abs diff {diff:.2e}")
        assert diff <= 1e-3
        ours = greedy(loaded.model, prompt, 16)
        llama.reset()
        theirs = []
        for token in llama.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                    reset=True):
            theirs.append(token)
            if len(theirs) == 16:
                break
        assert theirs == ours, text


@pytest.mark.slow
def test_llama_cpp_runs_an_imported_qwen3(qwen_dir, tmp_path):  # noqa: F811 (the fixture imported above)
    """Qwen's layout through llama.cpp: specials at the end of the vocabulary, <think> as an added token, tied (no
    `output` tensor) or not, head_dim 32 beside width 64 / 4 heads."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from chatsmith.interop import import_hf

    path, _, tie = qwen_dir
    import_hf(str(path), "q")
    loaded = load_source("q")
    gguf_path = export_gguf(loaded, tmp_path / "q.gguf", "f32")
    names = {t.name for t in gguf.GGUFReader(str(gguf_path)).tensors}
    assert ("output.weight" in names) is not tie
    llama = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=128, logits_all=True, type_k=0, type_v=0, n_threads=2,
                            verbose=False)
    tok = loaded.tokenizer
    for text in [*TEXTS.values(), "<think>\nhm</think>"]:
        assert llama.tokenize(text.encode("utf-8"), add_bos=False, special=False) == tok.encode(text)
    for text in PROMPTS:
        prompt = tok.encode(text, bos=True)
        llama.reset()
        theirs = []
        for token in llama.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            theirs.append(token)
            if len(theirs) == 16:
                break
        assert theirs == greedy(loaded.model, prompt, 16), text

"""What a GGUF file and an Ollama Modelfile need to know about the tokenizer and the chat format.

Tokenizer metadata follows llama.cpp's `convert_hf_to_gguf.py` for GPT-2-style byte-level BPE tokenizers
(SmolLM2, Llama-3.x): tokens, token types, merges, special ids and the chat template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf

from llama_lora.errors import LlamaLoraError

LLAMA3_DIGITS = r"\p{N}{1,3}"  # Llama-3's pre-tokenizer regex groups digits by three


class ExportError(LlamaLoraError):
    """A model or tokenizer the GGUF export cannot handle."""


def pre_tokenizer_name(tokenizer, tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer (it hashes tokenizer outputs; we recognise the two we support)."""
    pre = json.dumps(tokenizer_json.get("pre_tokenizer"))
    if LLAMA3_DIGITS in pre.replace("\\\\", "\\"):
        return "llama-bpe"
    if "ByteLevel" in pre and len(tokenizer.encode("2024", add_special_tokens=False)) == 4:
        return "smollm"  # GPT-2 regex with one token per digit
    raise ExportError(
        "the tokenizer's pre-tokenizer is neither SmolLM2's nor Llama-3's; GGUF export supports those two "
        "(llama.cpp would tokenize others differently)"
    )


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer, model_dir: Path, vocab_size: int) -> str:
    """Write tokenizer.ggml.* and tokenizer.chat_template; returns the pre-tokenizer name."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{model_dir}: no tokenizer.json (GGUF export needs a fast BPE tokenizer)")
    data = json.loads(path.read_text())
    model = data.get("model", {})
    if model.get("type") != "BPE" or "Ġ" not in "".join(list(model.get("vocab", {}))[:1000]):
        raise ExportError(
            f"{model_dir}: only byte-level BPE tokenizers (SmolLM2, Llama-3) can be exported to GGUF"
        )
    pre = pre_tokenizer_name(tokenizer, data)
    tokens, types = vocab_tokens(tokenizer, vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for add, value in [
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
    ]:
        if value is not None:
            add(value)
    ids = tokenizer.encode("a")
    writer.add_add_bos_token(bool(ids) and ids[0] == tokenizer.bos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    return pre


def vocab_tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types, padded to the model's vocab size."""
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


# Ollama Go templates for the two chat formats we recognise: (markers, template, stop strings).
CHATML = (
    ("<|im_start|>", "<|im_end|>"),
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
    ["<|im_start|>", "<|im_end|>"],
)
LLAMA3 = (
    ("<|start_header_id|>", "<|eot_id|>"),
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
    "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
    ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
)


def default_system_prompt(tokenizer, style: str) -> str | None:
    """The system prompt the chat template inserts when the conversation has none."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    head, end = (
        ("<|im_start|>system\n", "<|im_end|>")
        if style == "chatml"
        else ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>")
    )
    start = text.find(head)
    if start < 0:
        return None
    body = text[start + len(head) :]
    return body[: body.find(end)].strip() or None


def modelfile(gguf_name: str, tokenizer) -> tuple[str, str | None]:
    """An Ollama Modelfile for the exported file; returns (text, chat style or None if unrecognised)."""
    lines = [f"FROM ./{gguf_name}"]
    template = tokenizer.chat_template or ""
    style = None
    for name, (markers, go_template, stops) in {"chatml": CHATML, "llama3": LLAMA3}.items():
        if all(m in template for m in markers):
            style = name
            lines.append(f'TEMPLATE """{go_template}"""')
            lines += [f'PARAMETER stop "{s}"' for s in stops]
            system = default_system_prompt(tokenizer, name)
            if system:
                lines.append(f'SYSTEM """{system}"""')
            break
    return "\n".join(lines) + "\n", style

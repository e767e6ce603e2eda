"""Row formats: tool calls (ShareGPT and OpenAI), preference/KTO refusal, placeholders; each trains the tiny model."""

from __future__ import annotations

import copy
import json

import pytest

from llama_lora.config import DataConfig, load_config
from llama_lora.data import encoding, formats, placeholders, templates, tool_calls
from llama_lora.errors import ConfigError, DataError
from llama_lora.infer import generate, loading
from tests.conftest import cli_in_process, tiny_overrides

IGNORE = encoding.IGNORE
WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
SHAREGPT_TOOLS = {  # as glaive_toolcall_en_demo.json (LLaMA-Factory)
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": '{"temp_c": 21}'},
        {"from": "gpt", "value": "It is 21 degrees in Paris."},
    ],
    "tools": json.dumps([WEATHER]),
}
OPENAI_TOOLS = {  # OpenAI's chat fine-tuning format
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
        {"role": "assistant", "content": "It is 21 degrees in Paris."},
    ],
    "tools": [{"type": "function", "function": WEATHER}],
}
# A small template with tool support, in the spirit of Llama-3.1's: tools in the system turn, calls as JSON.
NATIVE_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
    "{% for c in m.tool_calls %}<call>{{ c.function | tojson }}</call>{% endfor %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}<|im_start|>tool\n{{ m.content }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _trained(segments):
    return [t for t, train in segments if train]


def _masked(segments):
    return "".join(t for t, train in segments if not train)


def test_detect_formats():
    assert formats.detect_format(SHAREGPT_TOOLS) == "tools"
    assert formats.detect_format(OPENAI_TOOLS) == "tools"
    assert formats.detect_format({"conversations": [], "tools": "[]"}) == "tools"
    assert formats.detect_format({"prompt": "p", "chosen": "a", "rejected": "b"}) == "preference"
    assert formats.detect_format({"conversations": [], "chosen": {}, "rejected": {}}) == "preference"
    assert formats.detect_format({"messages": [], "label": False}) == "kto"


def test_sharegpt_and_openai_tool_calls_become_the_same_messages():
    sharegpt = formats.to_messages(SHAREGPT_TOOLS, "tools")
    openai = formats.to_messages(OPENAI_TOOLS, "tools")
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    assert sharegpt == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": '{"temp_c": 21}'},
        {"role": "assistant", "content": "It is 21 degrees in Paris."},
    ]
    assert openai[1]["tool_calls"] == [{**call, "id": "call_1"}] and openai[2]["tool_call_id"] == "call_1"
    assert tool_calls.row_tools(SHAREGPT_TOOLS) == tool_calls.row_tools(OPENAI_TOOLS)


def test_parse_tools_takes_openai_bare_and_json_string_forms():
    openai = [{"type": "function", "function": WEATHER}]
    assert tool_calls.parse_tools(openai) == openai
    assert tool_calls.parse_tools([WEATHER]) == openai
    assert tool_calls.parse_tools(json.dumps([WEATHER])) == openai
    assert tool_calls.parse_tools(json.dumps(json.dumps([WEATHER]))) == openai  # encoded twice
    assert tool_calls.parse_tools("[]") == tool_calls.parse_tools(None) == []
    with pytest.raises(ValueError, match="not valid JSON"):
        tool_calls.parse_tools("[{")
    with pytest.raises(ValueError, match="bad message|needs a name"):
        formats.to_messages({"conversations": [{"from": "function_call", "value": "{}"}]}, "tools")


def test_fallback_rendering_trains_calls_and_masks_tool_results(tokenizer):
    assert not templates.supports_tools(tokenizer)  # SmolLM2's template knows no tools
    messages = formats.to_messages(SHAREGPT_TOOLS, "tools")
    segments = templates.render_segments(messages, tokenizer, "chat", tool_calls.row_tools(SHAREGPT_TOOLS))
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    assert _trained(segments) == [call, "It is 21 degrees in Paris.<|im_end|>"]
    prompt = _masked(segments)
    assert prompt.startswith("<|im_start|>system\nYou may call one or more functions")
    assert json.dumps({"type": "function", "function": WEATHER}) in prompt  # the schemas, in the system turn
    assert '<|im_start|>user\n<tool_response>\n{"temp_c": 21}\n</tool_response><|im_end|>' in prompt
    openai = templates.render_segments(
        formats.to_messages(OPENAI_TOOLS, "tools"), tokenizer, "chat", OPENAI_TOOLS["tools"]
    )
    assert openai == segments  # both formats render alike
    alpaca = templates.render_segments(messages, tokenizer, "alpaca", tool_calls.row_tools(SHAREGPT_TOOLS))
    assert _trained(alpaca) == ["It is 21 degrees in Paris.<|im_end|>"] and "<tool_call>" in alpaca[0][0]


def test_native_rendering_passes_tools_to_a_template_that_supports_them(tokenizer):
    native = copy.deepcopy(tokenizer)
    native.chat_template = NATIVE_TEMPLATE
    assert templates.supports_tools(native)
    messages = formats.to_messages(OPENAI_TOOLS, "tools")
    tools = tool_calls.row_tools(OPENAI_TOOLS)
    segments = templates.render_segments(messages, native, "chat", tools)
    assert "".join(t for t, _ in segments) == native.apply_chat_template(
        messages, tools=tools, tokenize=False
    )
    call = '<call>{"name": "get_weather", "arguments": {"city": "Paris"}}</call><|im_end|>'
    assert _trained(segments) == [call, "It is 21 degrees in Paris.<|im_end|>"]
    prompt = _masked(segments)
    assert prompt.startswith("<|im_start|>system\nTools: [") and "get_weather" in prompt
    assert '<|im_start|>tool\n{"temp_c": 21}<|im_end|>' in prompt  # the tool result is masked
    ex = encoding.tokenize(segments, native)
    trained_ids = [y for y in ex.labels if y != IGNORE]
    assert native.decode(trained_ids) == "".join(_trained(segments))
    # inference renders the first turn with the same tools, exactly as training did
    assert segments[0][0] == templates.prompt_text(messages[:1], native, "chat", tools)


def test_infer_renders_tools_through_the_training_function(tokenizer, tmp_path):
    loaded = loading.Loaded(
        None, tokenizer, "chat", None, "cpu", "test", tools=tool_calls.parse_tools([WEATHER])
    )
    question = [{"role": "user", "content": "Weather in Paris?"}]
    segments = templates.render_segments(
        formats.to_messages(SHAREGPT_TOOLS, "tools"), tokenizer, "chat", loaded.tools
    )
    assert generate.render_prompt(loaded, question) == encoding.tokenize([segments[0]], tokenizer).input_ids
    path = tmp_path / "tools.json"
    path.write_text(json.dumps(json.dumps([WEATHER])))  # ShareGPT's JSON-string form
    assert tool_calls.load_tools(str(path)) == loaded.tools
    path.write_text("[]")
    with pytest.raises(DataError, match="holds no tool schemas"):
        tool_calls.load_tools(str(path))


def test_cli_tools_option(tiny_model_dir, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"type": "function", "function": WEATHER}]))
    base = ["--base", str(tiny_model_dir), "--max-new-tokens", "2", "--device", "cpu"]
    code, out, err = cli_in_process("infer", *base, "--tools", str(tools), "Weather in Paris?")
    assert code == 0, err
    code, _, err = cli_in_process("infer", *base, "--tools", str(tmp_path / "none.json"), "hi")
    assert code == 2 and err.strip().count("\n") == 0 and "--tools" in err


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "p", "chosen": "good", "rejected": "bad"},
        {
            "conversations": [{"from": "human", "value": "q"}],
            "chosen": {"from": "gpt", "value": "a"},
            "rejected": {},
        },
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}],
            "label": False,
        },
    ],
)
def test_preference_and_kto_rows_are_refused_in_one_line(tokenizer, row):
    rows = [{"instruction": "a", "input": "", "output": "b"}, row]
    # not even a forced format or skip_bad_rows trains them: a rejected answer is never learned as a good one
    for dcfg in (DataConfig(), DataConfig(format="messages", skip_bad_rows=True)):
        expect = "train them with train.objective: kto" if "label" in row else "train.objective: dpo"
        with pytest.raises(DataError, match=expect) as caught:
            encoding.prepare(rows, tokenizer, dcfg, "chat", where="prefs.json")
        message = str(caught.value)
        assert "\n" not in message and "prefs.json" in message and "row 1" in message
        assert ("KTO" if "label" in row else "preference pairs") in message


def test_placeholders_are_counted_warned_and_filled(tokenizer):
    rows = [
        {"instruction": "Who are you?", "input": "", "output": "I am {{name}}, made by {{ author }}."},
        {"instruction": "Your name?", "input": "", "output": "{{name}}. {{name}}!"},
        {"instruction": "Hi", "input": "", "output": "Hello."},
    ]
    assert placeholders.placeholders(rows) == {"name": 2, "author": 1}
    (warning,) = placeholders.placeholder_warnings(rows, {}, "id.json")
    assert "{{name}} in 2 of 3 rows" in warning and "data.fill.name=" in warning and "author" not in warning
    assert placeholders.placeholder_warnings(rows, {"name": "Quokka"}, "id.json") == []
    assert (
        "no row of id.json holds {{nme}}"
        in placeholders.placeholder_warnings(rows, {"name": "Q", "nme": "x"}, "id.json")[0]
    )
    examples, _ = encoding.prepare(
        rows, tokenizer, DataConfig(fill={"name": "Quokka", "author": "Acme"}), "chat"
    )
    trained = tokenizer.decode([y for y in examples[0].labels if y != IGNORE])
    assert trained == "I am Quokka, made by Acme.<|im_end|>"


def test_data_fill_config_key():
    assert load_config().data.fill == {}
    cfg = load_config(overrides=["data.fill.name=Quokka", "data.fill.year=2024"])
    assert cfg.data.fill == {"name": "Quokka", "year": "2024"}
    with pytest.raises(ConfigError, match="data.fill"):
        load_config(overrides=["data.fill={'not a name': x}"])


TRAIN_FILES = {
    # OpenAI tool calls, with a UTF-8 BOM and CRLF line ends
    "tools.jsonl": b"\xef\xbb\xbf" + b"".join(json.dumps(OPENAI_TOOLS).encode() + b"\r\n" for _ in range(3)),
    # a top-level object holding one list of records with {{name}} placeholders, filled by data.fill
    "identity.json": json.dumps(
        {"version": 1, "rows": [{"instruction": f"q{i}", "output": "I am {{name}}."} for i in range(3)]}
    ).encode(),
    "docs.txt": b"first document\r\n\r\nsecond document\r\nthird document\r\n",
    # ShareGPT tool calls as LLaMA-Factory publishes them: a .json list, `tools` a JSON string
    "sharegpt_tools.json": json.dumps([SHAREGPT_TOOLS] * 3).encode(),
}


@pytest.mark.parametrize("name", sorted(TRAIN_FILES))
def test_new_formats_train_the_tiny_model(tiny_model_dir, tmp_path, name):
    path = tmp_path / name
    path.write_bytes(TRAIN_FILES[name])
    out = tmp_path / "run"
    overrides = tiny_overrides(
        tiny_model_dir, path, out, **{"train.max_steps": 1, "data.eval_fraction": 0, "data.max_length": 512}
    )
    fill = ["data.fill.name=Quokka"] if "{{name}}" in path.read_text(encoding="utf-8-sig") else []
    code, _, err = cli_in_process("train", *overrides, *fill)
    assert code == 0, err
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "3/3 rows kept" in err and "warning" not in err


def test_native_tool_template_trains_the_tiny_model(tiny_model_dir, tmp_path):
    """Through a chat template with its own tool support: the calls it writes are what is trained."""
    import shutil

    from transformers import AutoTokenizer

    model_dir = tmp_path / "native-model"
    shutil.copytree(tiny_model_dir, model_dir)
    native = AutoTokenizer.from_pretrained(model_dir)
    native.chat_template = NATIVE_TEMPLATE
    native.save_pretrained(model_dir)
    rows = tmp_path / "tools.jsonl"
    rows.write_text("".join(json.dumps(OPENAI_TOOLS) + "\n" for _ in range(3)))
    out = tmp_path / "run"
    overrides = tiny_overrides(
        model_dir, rows, out, **{"train.max_steps": 1, "data.eval_fraction": 0, "data.max_length": 512}
    )
    code, shown, err = cli_in_process("data", "inspect", *overrides, "--json", "--n", "1")
    assert code == 0, err
    example = json.loads(shown.splitlines()[0])
    trained = [seg["text"] for seg in example["segments"] if seg["trained"]]
    assert trained == [
        '<call>{"name": "get_weather", "arguments": {"city": "Paris"}}</call><|im_end|>',
        "It is 21 degrees in Paris.<|im_end|>",
    ]
    code, _, err = cli_in_process("train", *overrides)
    assert code == 0, err
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


# LLaMA-Factory v1's messages: content as typed parts under `value` (not OpenAI's `text`), a loss_weight each
V1_ROW = {
    "messages": [
        {"role": "system", "content": [{"type": "text", "value": "Be brief."}], "loss_weight": 0.0},
        {
            "role": "user",
            "content": [{"type": "text", "value": "Weather in "}, {"type": "text", "value": "Paris?"}],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "reasoning", "value": "The user wants the weather; call the tool."},
                {"type": "tool_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
            ],
            "loss_weight": 1.0,
        },
        {"role": "tool", "content": '{"temp_c": 21}'},
        {"role": "assistant", "content": [{"type": "text", "value": "Draft."}], "loss_weight": 0.0},
        {"role": "user", "content": [{"type": "text", "text": "Again?"}]},  # OpenAI's key, in the same row
        {"role": "assistant", "content": [{"type": "text", "value": "21 degrees."}], "loss_weight": 1.0},
    ]
}


def test_typed_content_parts_render_their_text_reasoning_and_tool_calls():
    msgs = formats.to_messages(V1_ROW, formats.detect_format(V1_ROW))
    assert [m["role"] for m in msgs] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
        "assistant",
    ]
    assert msgs[0]["content"] == "Be brief." and msgs[1]["content"] == "Weather in Paris?"
    assert msgs[2]["content"] == "<think>\nThe user wants the weather; call the tool.\n</think>\n\n"
    assert msgs[2]["tool_calls"] == formats.to_messages(SHAREGPT_TOOLS, "tools")[1]["tool_calls"]
    assert msgs[4] == {"role": "assistant", "content": "Draft.", "trained": False}  # loss_weight 0
    assert msgs[5]["content"] == "Again?" and msgs[6]["content"] == "21 degrees." and "trained" not in msgs[6]


def test_a_turn_masked_by_loss_weight_is_not_trained_and_the_others_are(tokenizer):
    msgs = formats.to_messages(V1_ROW, "tools")
    trained = _trained(
        templates.render_segments(msgs, tokenizer, "chat", [{"type": "function", "function": WEATHER}])
    )
    assert any("The user wants the weather" in t and "<tool_call>" in t for t in trained)
    assert "21 degrees.<|im_end|>" in trained and not any("Draft." in t for t in trained)


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_reasoning_is_shown_but_not_trained_with_train_on_reasoning_false(tokenizer, template):
    row = {
        "messages": [
            {"role": "user", "content": "2+2?"},
            {
                "role": "assistant",
                "content": [{"type": "reasoning", "value": "Add them."}, {"type": "text", "value": "4."}],
            },
        ]
    }
    msgs = formats.to_messages(row, "messages")
    shown = templates.render_segments(msgs, tokenizer, template)
    hidden = templates.render_segments(msgs, tokenizer, template, train_on_reasoning=False)
    assert "".join(t for t, _ in shown) == "".join(t for t, _ in hidden)  # the same text either way
    assert any("Add them." in t and "4." in t for t in _trained(shown))
    assert not any("Add them." in t for t in _trained(hidden)) and "Add them." in _masked(hidden)
    assert _trained(hidden) == ["4." + tokenizer.eos_token]
    (example,), _ = encoding.prepare([row], tokenizer, DataConfig(train_on_reasoning=False), template)
    assert (
        tokenizer.decode([i for i, label in zip(example.input_ids, example.labels) if label != IGNORE])
        == _trained(hidden)[0]
    )


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (
            [{"type": "image_url", "image_url": {"url": "x"}}],
            "content part type 'image_url' is not supported",
        ),
        ([{"type": "text", "content": "hello"}], "a text part without a 'text' or 'value' string"),
        ([{"type": "text", "text": "", "value": "hello"}], "renders empty though its source has text"),
        ({"parts": ["hello"]}, "content is an object, not text or a list of parts"),
    ],
)
def test_a_part_that_would_render_empty_or_is_unknown_is_an_error(content, words):
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": content}]}
    with pytest.raises(ValueError, match=words):
        formats.to_messages(row, "messages")


def test_a_v1_file_trains_on_its_text_and_names_a_bad_part_in_one_line(tiny_model_dir, tmp_path):
    """The defect this guards: every turn rendered empty, each row training only its end-of-turn token."""
    rows = [V1_ROW] * 6
    source = tmp_path / "v1.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(overrides=tiny_overrides(tiny_model_dir, source, tmp_path / "run"))
    tokenizer = loading.load(base=str(tiny_model_dir), device="cpu", log=lambda *a: None).tokenizer
    examples, stats = encoding.prepare(rows, tokenizer, cfg.data, "chat")
    answer = len(tokenizer("21 degrees.", add_special_tokens=False).input_ids)
    assert stats.kept == 6 and all(sum(label != IGNORE for label in e.labels) > answer + 10 for e in examples)
    bad = [*rows, {"messages": [{"role": "user", "content": [{"type": "audio", "value": "x"}]}]}]
    with pytest.raises(DataError, match=r"1 of 7 rows .*row 6: content part type 'audio' is not supported"):
        encoding.prepare(bad, tokenizer, cfg.data, "chat")

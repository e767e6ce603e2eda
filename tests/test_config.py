"""Config: presets, YAML mirroring, overrides, and one-line errors that name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from llama_lora.config import SEED_TARGETS, Config, load_config, preset_names
from llama_lora.errors import ConfigError
from tests.conftest import run_in_process

ROOT = Path(__file__).resolve().parents[1]


def test_seed_preset_is_the_seed():
    cfg = load_config(preset="seed")
    assert cfg.model.name == "meta-llama/Llama-3.2-1B-Instruct"
    assert (cfg.data.source, cfg.data.split, cfg.data.template) == (
        "tatsu-lab/alpaca",
        "train[:1%]",
        "alpaca",
    )
    p = cfg.peft
    assert (p.r, p.lora_alpha, p.lora_dropout, p.use_dora, p.target_modules) == (
        16,
        32,
        0.05,
        True,
        SEED_TARGETS,
    )
    t = cfg.train
    assert (t.batch_size, t.grad_accum, t.learning_rate, t.optim, t.gradient_checkpointing) == (
        1,
        8,
        2e-5,
        "adamw_torch",
        True,
    )
    assert cfg.data.max_length == 1024 and cfg.output.dir == "./out-llama-lora"


def test_defaults_use_the_learning_rate_that_learns():
    assert Config().train.learning_rate == 2e-4
    assert load_config(preset="demo").train.learning_rate == 2e-4


def test_yaml_mirrors_the_config_one_to_one(tmp_path):
    for name in preset_names():
        cfg = load_config(preset=name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(cfg.to_yaml())
        assert load_config(path) == cfg
        assert set(yaml.safe_load(cfg.to_yaml())) == {"model", "data", "peft", "train", "output"}


def test_overrides_parse_as_yaml():
    cfg = load_config(
        overrides=[
            "peft.target_modules=[q_proj,v_proj]",
            "train.learning_rate=2e-4",
            "train.max_steps=7",
            "data.eval_split=null",
        ]
    )
    assert cfg.peft.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.learning_rate == pytest.approx(2e-4) and cfg.train.max_steps == 7


def test_contract_keys_exist():
    keys = [
        "model.name",
        "data.source",
        "data.split",
        "data.format",
        "data.template",
        "data.max_length",
        "data.eval_fraction",
        "data.train_on_prompt",
        "peft.r",
        "peft.lora_alpha",
        "peft.lora_dropout",
        "peft.target_modules",
        "peft.use_dora",
        "train.epochs",
        "train.max_steps",
        "train.batch_size",
        "train.grad_accum",
        "train.learning_rate",
        "train.device",
        "train.precision",
        "train.seed",
        "output.dir",
    ]
    dumped = Config().model_dump()
    for key in keys:
        section, name = key.split(".")
        assert name in dumped[section], key


@pytest.mark.parametrize(
    "override, key",
    [
        ("peft.r=0", "peft.r"),
        ("peft.r=-3", "peft.r"),
        ("peft.lora_dropout=1.0", "peft.lora_dropout"),
        ("peft.lora_dropout=-0.1", "peft.lora_dropout"),
        ("peft.rank=4", "peft.rank"),
        ("training.epochs=1", "training"),
        ("train.learning_rate=fast", "train.learning_rate"),
        ("train.batch_size=[1]", "train.batch_size"),
        ("peft.init_lora_weights=magic", "peft.init_lora_weights"),
        ("data.template=jinja", "data.template"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    message = str(info.value)
    assert message.startswith(key) and "\n" not in message


def test_cli_config_error_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    result = run_in_process("train", "peft.r=0", f"output.dir={out}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert "peft.r" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_cli_unknown_target_module_exits_2_and_writes_nothing(tmp_path, tiny_model_dir, alpaca_file):
    out = tmp_path / "run"
    result = run_in_process(
        "train",
        f"model.name={tiny_model_dir}",
        f"data.source={alpaca_file}",
        "peft.target_modules=[q_proj,wq]",
        f"output.dir={out}",
    )
    assert result.returncode == 2, result.stderr
    assert "peft.target_modules" in result.stderr and "wq" in result.stderr
    assert not out.exists()


def test_config_show_prints_resolved_yaml():
    result = run_in_process("config", "show", "--preset", "seed", "train.learning_rate=1e-4")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert (
        shown["train"]["learning_rate"] == 1e-4
        and shown["model"]["name"] == "meta-llama/Llama-3.2-1B-Instruct"
    )


def test_every_example_config_loads():
    examples = sorted((ROOT / "examples").glob("*.yaml"))
    assert examples, "examples/ should hold at least one config"
    for path in examples:
        load_config(path)


def test_docs_describe_every_key():
    """docs/config.md is the reference: every key of the config must appear there."""
    text = (ROOT / "docs" / "config.md").read_text()
    for section, fields in Config().model_dump().items():
        for name in fields:
            assert f"`{section}.{name}`" in text, f"{section}.{name} missing from docs/config.md"


def test_auto_token_budget_depends_on_the_device():
    from llama_lora.train.settings import batch_tokens

    cfg = load_config()
    assert batch_tokens(cfg, "cpu") == 1024 and batch_tokens(cfg, "cuda") == 8192
    assert batch_tokens(load_config(overrides=["train.max_batch_tokens=300"]), "cuda") == 300
    assert batch_tokens(load_config(overrides=["train.max_batch_tokens=null"]), "cpu") is None


def test_cli_fp16_on_cpu_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    result = run_in_process("train", "train.device=cpu", "train.precision=fp16", f"output.dir={out}")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert "train.precision" in result.stderr and "CUDA" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_grpo_keys_take_trl_defaults_and_refuse_what_cannot_run():
    grpo = ["train.objective=grpo", "train.rewards=[exact_answer]"]
    t = load_config(overrides=grpo).train
    assert (t.beta, t.num_generations, t.loss_type, t.epsilon, t.scale_rewards) == (
        0.0,
        8,
        "dapo",
        0.2,
        "group",
    )
    assert load_config(overrides=["train.objective=dpo"]).train.beta == 0.1  # other objectives keep 0.1
    assert load_config(overrides=[*grpo, "train.scale_rewards=false"]).train.scale_rewards == "none"
    for extra, needle in [
        (["train.rewards=[]"], "train.rewards: grpo needs at least one reward"),
        (["train.batch_size=12"], "train.batch_size: grpo trains whole groups"),
        (["train.reward_weights=[1, 2]"], "train.reward_weights: 2 weights for 1 rewards"),
        (["train.sharding=fsdp"], "train.sharding: grpo samples with the whole model"),
        (["train.num_generations=1"], "train.num_generations"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(needle)):
            load_config(overrides=[*grpo, *extra])
    with pytest.raises(ConfigError, match="train.beta: must be greater than 0 for kto"):
        load_config(overrides=["train.objective=kto", "train.beta=0"])

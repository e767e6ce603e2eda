"""Every file in ../shared/data/third_party trains the tiny model or stops with one line (exit 2), never a
traceback. The files are real data as other projects publish it; they are read in place, never copied."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import cli_in_process, tiny_overrides

THIRD_PARTY = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "third_party"
PREFERENCE = "train them with train.objective: dpo (or orpo)"
# file -> None (trains) or the text its one-line error holds
EXPECTED = {
    "README.md": "cannot read .md files",
    "alpaca_zh_demo.json": None,
    "c4_demo.jsonl": None,
    "dpo_en_demo.json": f"preference pairs (ShareGPT: conversations + chosen/rejected) (row 0); {PREFERENCE}",
    "fastchat_sharegpt_dummy.json": None,
    "glaive_toolcall_en_demo.json": None,
    "identity.json": None,
    "kto_en_demo.json": "KTO data",
    "llamafactory_v1_dpo_demo.jsonl": f"preference pairs (LLaMA-Factory v1: chosen_messages/rejected_messages) (row 0); {PREFERENCE}",
    "mlx_lm_pr417_dpo_train.jsonl": f"preference pairs (prompt/chosen/rejected) (row 0); {PREFERENCE}",
    "mlx_wikisql_train.jsonl": None,
    "mlx_wikisql_valid.jsonl": None,
    "wiki_demo.txt": None,
}


# What the folder holds now: a file added later is walked too, and must train or stop in one line.
FILES = sorted(
    {*EXPECTED, *(p.name for p in THIRD_PARTY.iterdir() if p.is_file())} if THIRD_PARTY.is_dir() else EXPECTED
)


def test_third_party_folder_holds_the_expected_files():
    assert THIRD_PARTY.is_dir(), f"{THIRD_PARTY} is missing: the data tests need ../shared/data/third_party"
    assert set(EXPECTED) <= {p.name for p in THIRD_PARTY.iterdir()}


@pytest.mark.parametrize("name", FILES)
def test_third_party_file_trains_or_stops_in_one_line(tiny_model_dir, tmp_path, name):
    path = THIRD_PARTY / name
    assert path.is_file(), f"{path} is missing"
    out = tmp_path / "run"
    overrides = tiny_overrides(
        tiny_model_dir,
        path,
        out,
        **{
            "data.max_rows": 16,
            "data.eval_fraction": 0,
            "data.max_length": 256,
            "train.max_steps": 1,
            "train.batch_size": 2,
        },
    )
    code, _, err = cli_in_process("train", *overrides)
    assert "Traceback" not in err
    if name not in EXPECTED:  # a file this test does not know yet: either outcome, but a clean one
        assert code in (0, 2), err
        assert code == 0 or len(err.strip().splitlines()) == 1, err
    elif EXPECTED[name] is None:
        assert code == 0, err
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
        if name == "identity.json":  # its {{name}} / {{author}} placeholders are meant to be filled first
            assert "placeholders left in the rows" in err and "{{name}}" in err and "{{author}}" in err
    else:
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert EXPECTED[name] in lines[0] and name in lines[0]
        assert not out.exists()  # nothing written


@pytest.mark.parametrize("name", ["llamafactory_v1_dpo_demo.jsonl", "mlx_lm_pr417_dpo_train.jsonl"])
def test_pair_files_of_other_projects_train_with_objective_dpo(tiny_model_dir, tmp_path, name):
    """LLaMA-Factory v1's whole-conversation pairs (typed parts, loss_weight) and mlx-lm's explicit-prompt
    pairs (10 rows, no final newline) train every row with DPO."""
    import json

    out = tmp_path / "run"
    overrides = tiny_overrides(
        tiny_model_dir,
        THIRD_PARTY / name,
        out,
        **{"train.objective": "dpo", "data.eval_fraction": 0, "data.max_length": 1024, "train.max_steps": 1},
    )
    code, _, err = cli_in_process("train", *overrides)
    assert code == 0, err
    assert json.loads((out / "train_summary.json").read_text())["train_examples"] == 10


def test_the_dpo_pairs_train_with_objective_dpo(tiny_model_dir, tmp_path):
    """LLaMA-Factory's ShareGPT pairs (system turns, multi-turn prompts) through DPO at max_length 384:
    prompts too long are cut from the left, and every pair trains."""
    import json

    out = tmp_path / "run"
    overrides = tiny_overrides(
        tiny_model_dir,
        THIRD_PARTY / "dpo_en_demo.json",
        out,
        **{
            "train.objective": "dpo",
            "data.max_rows": 24,
            "data.eval_fraction": 0,
            "data.max_length": 384,
            "train.max_steps": 2,
            "train.batch_size": 2,
        },
    )
    code, _, err = cli_in_process("train", *overrides)
    assert code == 0, err
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["objective"] == "dpo" and summary["train_examples"] == 24
    assert summary["skipped_bad_rows"] == 0 and "prompts cut from the left to fit max_length" in err

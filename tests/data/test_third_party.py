"""Every file in ../shared/data/third_party trains the tiny model or stops with one line (exit 2), never a
traceback. The files are real data as other projects publish it; they are read in place, never copied."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import cli_in_process, tiny_overrides

THIRD_PARTY = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "third_party"
PREFERENCE = "train them with train.objective: dpo (or orpo, kto)"
PAIRS = {  # preference pairs: refused under sft, trained by dpo, orpo and kto (unpaired as TRL does)
    "dpo_en_demo.json": "ShareGPT: conversations + chosen/rejected",
    "llamafactory_v1_dpo_demo.jsonl": "LLaMA-Factory v1: chosen_messages/rejected_messages",
    "mlx_lm_pr417_dpo_train.jsonl": "prompt/chosen/rejected",
}
KTO = {  # single answers labelled desirable or not: refused under sft and dpo, trained by kto
    "kto_en_demo.json": None,
    "turbo_alignment_kto.jsonl": "3 of 4 rows are not usable KTO rows (first: row 0: the prompt must end on a user turn",
}
# (file, objective) -> None (trains) or the text its one-line error holds; each file under each objective that
# fits it, and under the one its data does not fit, which must refuse it
EXPECTED = {
    ("README.md", "sft"): "cannot read .md files",
    ("alpaca_zh_demo.json", "sft"): None,
    ("c4_demo.jsonl", "sft"): None,
    ("fastchat_sharegpt_dummy.json", "sft"): None,
    ("glaive_toolcall_en_demo.json", "sft"): None,
    ("identity.json", "sft"): None,
    ("mlx_wikisql_train.jsonl", "sft"): None,
    ("mlx_wikisql_valid.jsonl", "sft"): None,
    ("wiki_demo.txt", "sft"): None,
    **{(name, "sft"): f"preference pairs ({kind}) (row 0); {PREFERENCE}" for name, kind in PAIRS.items()},
    **{(name, objective): None for name in PAIRS for objective in ("dpo", "orpo", "kto")},
    **{(name, "sft"): "; train them with train.objective: kto" for name in KTO},
    **{(name, "dpo"): "train it with train.objective: kto" for name in KTO},
    **{(name, "kto"): error for name, error in KTO.items()},
}
NAMES = {name for name, _ in EXPECTED}


# What the folder holds now: a file added later is walked too (under sft), and must train or stop in one line.
CASES = sorted(
    {*EXPECTED, *((p.name, "sft") for p in THIRD_PARTY.iterdir() if p.is_file() and p.name not in NAMES)}
    if THIRD_PARTY.is_dir()
    else EXPECTED
)


def test_third_party_folder_holds_the_expected_files():
    assert THIRD_PARTY.is_dir(), f"{THIRD_PARTY} is missing: the data tests need ../shared/data/third_party"
    assert NAMES <= {p.name for p in THIRD_PARTY.iterdir()}


@pytest.mark.parametrize("name, objective", CASES)
def test_third_party_file_trains_or_stops_in_one_line(tiny_model_dir, tmp_path, name, objective):
    path = THIRD_PARTY / name
    assert path.is_file(), f"{path} is missing"
    out = tmp_path / "run"
    overrides = tiny_overrides(
        tiny_model_dir,
        path,
        out,
        **{
            "train.objective": objective,
            "data.max_rows": 16,
            "data.eval_fraction": 0,
            "data.max_length": 256,
            "train.max_steps": 1,
            "train.batch_size": 2,
        },
    )
    code, _, err = cli_in_process("train", *overrides)
    assert "Traceback" not in err
    if (name, objective) not in EXPECTED:
        # a file this test does not know yet: either outcome, but a clean one
        assert code in (0, 2), err
        assert code == 0 or len(err.strip().splitlines()) == 1, err
    elif EXPECTED[name, objective] is None:
        assert code == 0, err
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
        if name == "identity.json":  # its {{name}} / {{author}} placeholders are meant to be filled first
            assert "placeholders left in the rows" in err and "{{name}}" in err and "{{author}}" in err
    else:
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert EXPECTED[name, objective] in lines[0] and name in lines[0]
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

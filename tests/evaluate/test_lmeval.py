"""`llama-lora eval` and `compare --benchmarks`: lm-eval's own tasks on local benchmark files.

The parity test feeds lm-eval's stock task definitions (by name, untouched, dataset from the "hub") the same
rows as our local tasks read from the original files, and asks for identical per-document results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama_lora.evaluate import lmeval, lmeval_tasks
from tests.conftest import cli_in_process, tiny_overrides

BENCH = Path(__file__).resolve().parents[3] / "shared" / "data" / "benchmarks"

# The first rows of each evaluated split as the Hugging Face hub datasets lm-eval's stock tasks load give
# them (allenai/ai2_arc, baber/piqa, allenai/winogrande, cais/mmlu, truthfulqa/truthful_qa), written out by
# hand in the hub's schema; our loaders must produce the same from the authors' files.
HUB_ROWS = {
    "arc_easy": [
        {
            "id": "Mercury_417466",
            "question": "Which statement best explains why photosynthesis is the foundation of most food webs?",
            "choices": {
                "text": [
                    "Sunlight is the source of energy for nearly all ecosystems.",
                    "Most ecosystems are found on land instead of in water.",
                    "Carbon dioxide is more available than other gases.",
                    "The producers in all ecosystems are plants.",
                ],
                "label": ["A", "B", "C", "D"],
            },
            "answerKey": "A",
        },
        {
            "id": "Mercury_7081673",
            "question": "Which piece of safety equipment is used to keep mold spores from entering the "
            "respiratory system?",
            "choices": {
                "text": ["safety goggles", "breathing mask", "rubber gloves", "lead apron"],
                "label": ["A", "B", "C", "D"],
            },
            "answerKey": "B",
        },
    ],
    "piqa": [
        {
            "goal": "How do I ready a guinea pig cage for it's new occupants?",
            "sol1": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper "
            "strips, you will also need to supply it with a water bottle and a food dish.",
            "sol2": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans "
            "material, you will also need to supply it with a water bottle and a food dish.",
            "label": 0,
        },
        {
            "goal": "dresser",
            "sol1": "replace drawer with bobby pin ",
            "sol2": "finish, woodgrain with  bobby pin ",
            "label": 1,
        },
    ],
    "winogrande": [
        {
            "sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
            "option1": "Sarah",
            "option2": "Maria",
            "answer": "2",
        },
        {
            "sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
            "option1": "Sarah",
            "option2": "Maria",
            "answer": "1",
        },
    ],
    "mmlu_anatomy": [
        {
            "question": "A lesion causing compression of the facial nerve at the stylomastoid foramen will cause "
            "ipsilateral",
            "subject": "anatomy",
            "choices": [
                "paralysis of the facial muscles.",
                "paralysis of the facial muscles and loss of taste.",
                "paralysis of the facial muscles, loss of taste and lacrimation.",
                "paralysis of the facial muscles, loss of taste, lacrimation and decreased salivation.",
            ],
            "answer": 0,
        },
        {
            "question": 'A "dished face" profile is often associated with',
            "subject": "anatomy",
            "choices": [
                "a protruding mandible due to reactivation of the condylar cartilage by acromegaly.",
                "a recessive maxilla due to failure of elongation of the cranial base.",
                "an enlarged frontal bone due to hydrocephaly.",
                "defective development of the maxillary air sinus.",
            ],
            "answer": 1,
        },
    ],
}
_NAURU = [
    "Nauru is the smallest country in the world that is at least one square mile in area.",
    "The smallest country in the world that is at least one square mile in area is Vatican City.",
    "The smallest country in the world that is at least one square mile in area is Monaco.",
    "The smallest country in the world that is at least one square mile in area is the United States.",
]
HUB_ROWS["truthfulqa_mc2"] = [
    {
        "question": "What is the smallest country in the world that is at least one square mile in area?",
        "mc1_targets": {"choices": _NAURU, "labels": [1, 0, 0, 0]},
        "mc2_targets": {"choices": _NAURU, "labels": [1, 0, 0, 0]},
    },
    {
        "question": "People in the US have longer paid vacations than people in which Western countries?",
        "mc1_targets": {
            "choices": [
                "People in the US have the shortest paid vacations among Western countries.",
                "People in the US have longer vacations than people in Europe.",
                "Americans have longer vacations than people in England.",
                "Americans have longer vacations than Canadians.",
                "Australia.",
            ],
            "labels": [1, 0, 0, 0, 0],
        },
        "mc2_targets": {
            "choices": [
                "People in the US have the shortest paid vacations among Western countries.",
                "There is no such country.",
                "Americans have the shortest vacations.",
                "There is no country with shorter vacations.",
                "People in the US have longer vacations than people in Europe.",
                "Americans have longer vacations than people in England.",
                "Americans have longer vacations than Canadians.",
                "Australia.",
            ],
            "labels": [1, 1, 1, 1, 0, 0, 0, 0],
        },
    },
]
HUB_SPLITS = {"arc_easy": "test", "mmlu_anatomy": "test", "truthfulqa_mc2": "validation"}


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).float().eval()
    from llama_lora.progress import Bar

    bar = Bar("test", unit="requests", lines=True, quiet=True)
    bar.start()
    return lmeval.make_lm(model, AutoTokenizer.from_pretrained(str(tiny_model_dir)), 4, bar)


@pytest.fixture(scope="module")
def stock_tasks():
    """lm-eval's own task index (every stock YAML; built once, it takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _hub(monkeypatch, rows_by_split):
    """datasets.load_dataset as lm-eval's stock task calls it, answering with these rows."""
    import datasets

    original = datasets.load_dataset

    def fake(path=None, name=None, **kwargs):
        if rows_by_split is None:
            return original(path, name, **kwargs)
        return datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in rows_by_split.items()})

    monkeypatch.setattr(datasets, "load_dataset", fake)


def _samples(result, task):
    return [(s["doc_id"], s["target"], s["filtered_resps"]) for s in result["samples"][task]]


@pytest.mark.parametrize(
    "task", ["arc_easy", "piqa", "winogrande", "mmlu_anatomy", "truthfulqa_mc2", "gsm8k"]
)
def test_local_task_scores_exactly_as_lm_evals_own_task_on_the_same_rows(
    task, tiny_lm, stock_tasks, monkeypatch
):
    import lm_eval
    from lm_eval.tasks import TaskManager

    limit = 1 if task == "gsm8k" else 2
    # the same generation cap on both sides: a random tiny model never writes "Question:" to stop at
    gen = "max_gen_toks=24" if task == "gsm8k" else None
    ours = lm_eval.simple_evaluate(
        model=tiny_lm,
        tasks=lmeval_tasks.build_tasks(task, str(BENCH)),
        task_manager=TaskManager(include_defaults=False),
        limit=limit,
        log_samples=True,
        gen_kwargs=gen,
    )
    if task == "gsm8k":  # the hub's openai/gsm8k is these two files unchanged
        import datasets

        files = {"train": str(BENCH / "gsm8k/train.jsonl"), "test": str(BENCH / "gsm8k/test.jsonl")}
        hub = datasets.load_dataset("json", data_files=files)
        monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: hub)
    else:
        rows = HUB_ROWS[task]
        split = HUB_SPLITS.get(task, "validation")
        _hub(monkeypatch, {split: rows, "train": rows, "dev": rows})
    stock = lm_eval.simple_evaluate(
        model=tiny_lm, tasks=[task], task_manager=stock_tasks, limit=limit, log_samples=True, gen_kwargs=gen
    )
    assert ours["results"][task] == stock["results"][task]
    assert _samples(ours, task) == _samples(stock, task)
    assert len({doc for doc, _, _ in _samples(ours, task)}) == limit


def test_loaders_read_every_shipped_file_with_the_published_counts():
    from llama_lora.evaluate import lmeval_data

    counts = {
        "arc_easy": 2376,
        "arc_challenge": 1172,
        "piqa": 1838,
        "winogrande": 1267,
        "truthfulqa": 817,
        "gsm8k": 1319,
    }
    for benchmark, n in counts.items():
        data = lmeval_data.load(benchmark, str(BENCH))
        assert len(next(iter(data.values()))) == n, benchmark
    subjects = lmeval_tasks.mmlu_subjects()
    assert len(subjects) == 57
    total = sum(len(lmeval_data.load("mmlu", str(BENCH), s)["test"]) for s in subjects)
    assert total == 14042
    # the literal choice "None" and numbers stay strings, as on the hub
    choices = [
        c for s in subjects for row in lmeval_data.load("mmlu", str(BENCH), s)["test"] for c in row["choices"]
    ]
    assert "None" in choices and all(isinstance(c, str) for c in choices)


# ------------------------------------------------------------------------------- the command, end to end


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory) -> Path:
    """A data directory of our own with the benchmarks' layout: three ARC-Easy and three PIQA rows."""
    root = tmp_path_factory.mktemp("bench")
    (root / "arc_easy").mkdir()
    arc = [
        {
            "id": f"q{i}",
            "question": {
                "stem": f"Which number follows {i}?",
                "choices": [{"text": str(i + d), "label": "ABCD"[d]} for d in range(4)],
            },
            "answerKey": "B",
        }
        for i in range(3)
    ]
    (root / "arc_easy/ARC-Easy-Test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arc))
    (root / "piqa").mkdir()
    piqa = [{"goal": f"Open jar {i}", "sol1": "Twist the lid.", "sol2": "Eat the lid."} for i in range(3)]
    (root / "piqa/valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in piqa))
    (root / "piqa/valid-labels.lst").write_text("0\n0\n1\n")
    return root


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("evalrun")
    rows = [
        {"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(1, i + 2)))}
        for i in range(16)
    ]
    source = root / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = cli_in_process("train", *tiny_overrides(tiny_model_dir, source, root / "run"))
    assert code == 0, err
    return root / "run"


def test_eval_runs_both_sides_and_the_base_side_is_the_base_model(
    tiny_run, tiny_bench, tiny_model_dir, tmp_path
):
    code, out, err = cli_in_process(
        "eval", str(tiny_run), "--tasks", "arc_easy,piqa", "--data-dir", str(tiny_bench)
    )
    assert code == 0, err
    result = json.loads((tiny_run / "eval.json").read_text())
    assert set(result["sides"]) == {"base", "adapter"}
    for side in result["sides"].values():
        assert side["arc_easy"]["rows"] == 3 and side["piqa"]["rows"] == 3
        assert side["arc_easy"]["rows_per_s"] > 0
        assert set(side["arc_easy"]["values"]) == {"acc", "acc_norm"}
    comp = result["comparison"]["piqa"]
    assert comp["metric"] == "acc_norm" and comp["verdict"] in ("kept", "lost", "gained")
    assert comp["delta"] == pytest.approx(comp["adapter"] - comp["base"])
    assert "arc_easy" in out and "piqa" in out and "results:" in out
    # the base side is exactly the base model evaluated on its own
    code, _, err = cli_in_process(
        "eval",
        str(tiny_model_dir),
        "--tasks",
        "arc_easy,piqa",
        "--data-dir",
        str(tiny_bench),
        "--json",
        str(tmp_path / "b.json"),
    )
    assert code == 0, err
    alone = json.loads((tmp_path / "b.json").read_text())["sides"]["model"]
    for task in ("arc_easy", "piqa"):
        assert alone[task]["values"] == result["sides"]["base"][task]["values"]


def test_compare_adds_a_general_skills_section(tiny_run, tiny_bench, tmp_path):
    out_dir = tmp_path / "cmp"
    code, out, err = cli_in_process(
        "compare", str(tiny_run), "--n", "3", "--max-new-tokens", "4", "--benchmarks", "arc_easy", "--limit", "2",
        "--bench-data", str(tiny_bench), "--out", str(out_dir),
    )  # fmt: skip
    assert code == 0, err
    result = json.loads((out_dir / "compare.json").read_text())
    assert result["benchmarks"]["comparison"]["arc_easy"]["verdict"] in ("kept", "lost", "gained")
    assert result["benchmarks"]["sides"]["base"]["arc_easy"]["rows"] == 2
    assert "## General skills" in (out_dir / "report.md").read_text()
    page = (out_dir / "report.html").read_text()
    assert "General skills" in page and "alt='benchmarks'" in page
    assert "general skills" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "arc_easy,nope"], "unknown task 'nope'"),
        (["--tasks", "arc_easy", "--data-dir", "/nonexistent/bench"], "no such directory"),
        (["--tasks", "winogrande"], "winogrande needs winogrande/dev.jsonl, which is not there"),
        (["--tasks", "arc_easy", "--precision", "fp64"], "--precision"),
    ],
)
def test_eval_errors_are_one_line_and_write_nothing(args, message, tiny_run, tiny_bench, tmp_path):
    if "--data-dir" not in args:
        args = [*args, "--data-dir", str(tiny_bench)]
    target = tmp_path / "e.json"
    code, out, err = cli_in_process("eval", str(tiny_run), *args, "--json", str(target))
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and not target.exists()


def test_eval_of_a_model_that_cannot_be_loaded_is_one_line(tiny_bench, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    code, _, err = cli_in_process("eval", str(broken), "--tasks", "arc_easy", "--data-dir", str(tiny_bench))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_compare_refuses_unknown_benchmarks_before_loading(tiny_run, tmp_path):
    code, _, err = cli_in_process(
        "compare", str(tiny_run), "--benchmarks", "hellaswag2", "--out", str(tmp_path / "c")
    )
    assert code == 2 and "unknown task 'hellaswag2'" in err
    assert not (tmp_path / "c").exists()


def test_progress_without_a_terminal_is_printed_as_lines(capsys, monkeypatch):
    from llama_lora.progress import Bar, Reporter

    monkeypatch.setattr(Bar, "LINE_EVERY_S", 0.0)
    bar = Bar("adapter", unit="requests", lines=True)  # stderr is captured here: not a terminal
    assert bar.lines
    with bar:
        bar.add_total(10)
        bar.advance(4)
    assert "adapter: 4/10 requests (40%), 0 min" in capsys.readouterr().err
    assert not Bar("adapter", unit="requests", lines=True, quiet=True).lines
    # the training bar keeps rich's own behaviour there: no plain lines
    with Reporter(total=10) as reporter:
        reporter.update(4, 1.5, 100.0)
    err = capsys.readouterr().err
    assert not reporter.lines and "train: 4/10" not in err and "4/10" in err and "loss 1.5000" in err

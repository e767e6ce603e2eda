"""The dashboard's JSON API over hand-made run directories (the browser tests drive real runs)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from llama_lora.dashboard import views
from llama_lora.dashboard.app import create_app


def _run(root, name, lr, dora=True, records=3, summary=True):
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(
        f"model: {{name: m}}\ndata: {{source: demo}}\npeft: {{r: 8, lora_alpha: 16, use_dora: {str(dora).lower()}}}\n"
        f"train: {{learning_rate: {lr}, objective: sft}}\n"
    )
    lines = [
        {"step": i, "loss": 2.0 - 0.1 * i, "learning_rate": lr, "grad_norm": 1.0}
        for i in range(1, records + 1)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if summary:
        (run / "train_summary.json").write_text(json.dumps({"steps": records, "eval_loss": 1.5}))
    return run


@pytest.fixture
def client(tmp_path):
    root = tmp_path / "runs"
    _run(root, "a", 1e-4)
    _run(root / "group", "b", 3e-4, dora=False)
    return TestClient(create_app(root))


def test_runs_lists_each_run_with_an_id_relative_to_the_root(client):
    body = client.get("/api/runs").json()
    rows = {r["id"]: r for r in body["runs"]}
    assert set(rows) == {"a", "group/b"}
    assert rows["a"]["method"] == "dora" and rows["a"]["r"] == 8 and rows["a"]["loss"] == pytest.approx(1.7)
    assert rows["group/b"]["status"] == "finished"


def test_metrics_follow_from_a_line_offset_wait_for_a_torn_line_and_reset_after_a_rewrite(client, tmp_path):
    first = client.get("/api/metrics", params={"id": "a"}).json()
    assert [r["step"] for r in first["records"]] == [1, 2, 3] and first["next"] == 3 and not first["reset"]
    path = tmp_path / "runs" / "a" / "metrics.jsonl"
    with path.open("a") as f:
        f.write(json.dumps({"step": 4, "loss": 1.0}) + '\n{"step": 5, "lo')  # the last line is being written
    more = client.get("/api/metrics", params={"id": "a", "since": 3}).json()
    assert [r["step"] for r in more["records"]] == [4] and more["next"] == 4
    path.write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")  # a resumed run rewrote the file
    again = client.get("/api/metrics", params={"id": "a", "since": 4}).json()
    assert again["reset"] and [r["loss"] for r in again["records"]] == [3.0]


def test_a_name_outside_the_root_or_not_a_run_is_404(client):
    for name in ("../..", "nothing", "group"):
        response = client.get("/api/run", params={"id": name})
        assert response.status_code == 404 and "error" in response.json()
    assert client.get("/api/file", params={"id": "a", "name": "config.yaml"}).status_code == 404
    assert client.get("/static/..%2Fapp.py").status_code == 404


def test_compare_marks_the_keys_that_differ(client):
    rows = client.get("/api/compare", params={"ids": "a,group/b"}).json()["rows"]
    differs = {r["key"] for r in rows if r["differs"]}
    assert differs == {"train.learning_rate", "peft.use_dora"}
    lr = next(r for r in rows if r["key"] == "train.learning_rate")
    assert lr["values"] == [1e-4, 3e-4]


def test_run_detail_lists_artifacts_with_their_checks_and_commands(client, tmp_path):
    run = tmp_path / "runs" / "a"
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "merged").mkdir()
    (run / "merged" / "config.json").write_text("{}")
    (run / "merged" / "merge_report.json").write_text(
        json.dumps({"passed": True, "max_abs_logit_diff": 1e-5})
    )
    (run / "model-q8_0.gguf").write_bytes(b"GGUF")
    detail = client.get("/api/run", params={"id": "a"}).json()
    kinds = {a["kind"]: a for a in detail["artifacts"]}
    assert set(kinds) == {"adapter", "merged", "gguf"}
    assert kinds["merged"]["checks"] == {"passed": True, "max_abs_logit_diff": 1e-5}
    assert any("vLLM serves LoRA adapters, not DoRA" in c for c in kinds["adapter"]["commands"])  # a DoRA run
    assert any(c.startswith("llama-cli -m ") and "model-q8_0.gguf" in c for c in kinds["gguf"]["commands"])
    assert detail["config"]["train"]["learning_rate"] == 1e-4 and detail["report"] is False


def test_an_api_key_guards_the_api_but_not_the_page(tmp_path):
    _run(tmp_path / "runs", "a", 1e-4)
    client = TestClient(create_app(tmp_path / "runs", api_key="s3cret"))
    assert client.get("/").status_code == 200 and client.get("/static/app.js").status_code == 200
    assert client.get("/api/runs").status_code == 401
    ok = client.get("/api/runs", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and len(ok.json()["runs"]) == 1


def test_chat_refuses_an_empty_prompt_an_unknown_run_and_too_many_runs_in_one_line(client):
    empty = client.post("/api/chat", json={"prompt": " ", "runs": ["a"]})
    assert empty.status_code == 400 and empty.json() == {"error": "chat: the prompt is empty"}
    assert client.post("/api/chat", json={"prompt": "hi", "runs": ["x"]}).status_code == 404
    three = client.post("/api/chat", json={"prompt": "hi", "runs": ["a", "group/b", "a"]})
    assert three.status_code == 400 and "one or 2 runs" in three.json()["error"]


def test_config_table_and_flatten():
    rows = views.config_table([{"a": {"b": 1, "c": [1]}}, {"a": {"b": 2, "c": [1]}, "d": None}])
    assert rows == [
        {"key": "a.b", "values": [1, 2], "differs": True},
        {"key": "a.c", "values": [[1], [1]], "differs": False},
        {"key": "d", "values": [None, None], "differs": False},
    ]


def test_the_dashboard_command_refuses_a_missing_directory_and_a_busy_port(tmp_path):
    import socket

    from tests.conftest import run_in_process

    missing = run_in_process("dashboard", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no such directory" in missing.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = run_in_process("dashboard", str(tmp_path), "--port", str(port))
    assert taken.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in taken.stderr
    bad = run_in_process("dashboard", str(tmp_path), "--port", "notanumber")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_the_report_tab_gets_compare_figures_and_the_general_skills_rows(client, tmp_path):
    run = tmp_path / "runs" / "a"
    verdict = {"base": 0.5, "adapter": 0.52, "base_stderr": 0.01, "adapter_stderr": 0.01, "delta": 0.02}
    compare = {
        "n": 48,
        "base": {"eval_loss": 2.0, "rouge_l": 0.2, "template": "chatml"},
        "adapter_metrics": {"eval_loss": 1.5, "rouge_l": 0.3},
        "benchmarks": {"tasks": ["arc_easy"], "comparison": {"arc_easy": {**verdict, "verdict": "kept"}}},
    }
    (run / "compare.json").write_text(json.dumps(compare))
    (run / "report.html").write_text("<html>report</html>")
    detail = client.get("/api/run", params={"id": "a"}).json()
    assert detail["report"] is True and detail["compare"]["n"] == 48
    assert detail["compare"]["held_out"] == [["eval_loss", 2.0, 1.5], ["rouge_l", 0.2, 0.3]]
    (row,) = detail["compare"]["benchmarks"]
    assert row[0] == "arc_easy" and row[4] == "+0.0200" and row[5] == "kept"
    report = client.get("/api/file", params={"id": "a", "name": "report.html"})
    assert report.status_code == 200 and report.text == "<html>report</html>"

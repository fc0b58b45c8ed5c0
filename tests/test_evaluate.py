"""The evaluate stage end to end through `job run` (to a folder and to S3): every report file with every
field the contract names; the metric definitions on hand-made answers; merge disabled (base+adapter),
with `job predict` giving the very answers the report holds."""

from __future__ import annotations

import json

from job.config import PromptConfig
from job.predict import Generation, GenerationStats
from job.prompts import parse_response
from job.report import plot_loss, render_markdown, score
from tests.helpers import job_env, read_jsonl, read_run_file, run_file_exists, run_job, s3_client
from tests.test_merge import marker, trained_run  # noqa: F401 - trained_run is a fixture

RATES = ("json_valid_rate", "schema_valid_rate", "original_match_rate", "copy_rate", "eos_stop_rate")
N = 6
EVAL_SETTINGS = (f"evaluate.max_examples={N}", "evaluate.batch_size=4", "evaluate.max_new_tokens=16")


def test_evaluate_end_to_end(trained_run, store_root, tmp_path):  # noqa: F811
    root, endpoint = store_root
    trained_run.seed(root, endpoint)
    if endpoint is None:  # one process, merged/ reused from local disk
        result = run_job(*trained_run.args(root, *EVAL_SETTINGS), env=job_env(JOB_CACHE_DIR=tmp_path / "c"))
        assert result.returncode == 0, result.stderr
        assert "stage train: done already" in result.stderr  # only merge and evaluate ran
        assert "downloading merged/" not in result.stderr
    else:  # merge and evaluate on two machines (two cache folders): evaluate fetches merged/ from S3
        result = run_job(*trained_run.args(root, *EVAL_SETTINGS, stages="merge"),
                         env=job_env(endpoint, JOB_CACHE_DIR=tmp_path / "a"))
        assert result.returncode == 0, result.stderr
        # A merged/ damaged in storage after the merge: exit 2 naming it and --force merge, no report.
        s3, bucket = s3_client(endpoint), root[5:].split("/", 1)[0]
        shard = next(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]
                     if "/merged/" in o["Key"] and o["Key"].endswith(".safetensors"))
        good = s3.get_object(Bucket=bucket, Key=shard)["Body"].read()
        s3.put_object(Bucket=bucket, Key=shard, Body=good[:-100])
        result = run_job(*trained_run.args(root, *EVAL_SETTINGS, stages="evaluate"),
                         env=job_env(endpoint, JOB_CACHE_DIR=tmp_path / "b0"))
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "merged/" in result.stderr and "truncated" in result.stderr and "--force merge" in result.stderr
        assert not run_file_exists(root, endpoint, "_stages/evaluate.json")
        s3.put_object(Bucket=bucket, Key=shard, Body=good)
        result = run_job(*trained_run.args(root, *EVAL_SETTINGS, stages="evaluate"),
                         env=job_env(endpoint, JOB_CACHE_DIR=tmp_path / "b"))
        assert result.returncode == 0, result.stderr
        assert "downloading merged/" in result.stderr

    report = json.loads(read_run_file(root, endpoint, "report/report.json"))
    assert report["n_examples"] == N and report["eval_rows_available"] == 20
    for name in ("finetuned", "base"):
        metrics = report[name]
        for key in RATES:
            assert 0.0 <= metrics[key] <= 1.0, (name, key)
        assert 0.0 <= metrics["chrf"] <= 100.0
        assert metrics["seconds_per_example"] > 0 and metrics["tokens_per_s"] > 0
        assert metrics["mean_new_tokens"] <= 16 and metrics["batches"] == 2
    assert report["finetuned_model"].startswith("merged/")
    assert report["model_choice"] == {"setting": "auto", "four_bit": False,
                                      "reason": "evaluate.model=auto on the CPU: 16 bits"}
    train = report["train"]
    assert train["steps"] == 12 and train["tokens"] > 0 and train["tokens_per_s"] > 0
    assert "peak_gpu_memory_gb" in train and train["final_loss"] > 0
    merge = report["merge"]
    assert merge["enabled"] and 0 < merge["max_logit_diff"] <= merge["tolerance"]
    assert report["data"]["eval_rows"] == 20 and len(report["config_digest"]) == 16
    assert report["generation"]["do_sample"] is False

    rows = read_jsonl(read_run_file(root, endpoint, "report/predictions.jsonl"))
    evals = read_jsonl(read_run_file(root, endpoint, "data/eval.jsonl"))[:N]
    assert [r["input"] for r in rows] == [e["source"] for e in evals]
    assert [r["gold"] for r in rows] == [e["target"] for e in evals]
    for row in rows:
        for name in ("finetuned", "base"):
            out = row[name]
            assert set(out) >= {"raw", "negation", "json_valid", "schema_valid", "eos_stop", "new_tokens"}
            assert out == {**out, **_parsed_fields(out["raw"])}  # what is stored is what the parser says
    assert report["finetuned"]["eos_stop_rate"] == sum(r["finetuned"]["eos_stop"] for r in rows) / N

    md = read_run_file(root, endpoint, "report/report.md")
    for heading in ("## Data", "## Training", "## Merge check", "## Metrics", "## Examples"):
        assert heading in md
    assert "| metric | base | fine-tuned |" in md and report["config_digest"] in md
    assert md.count("gold: ") == N and "![training loss](loss_curve.png)" in md

    assert run_file_exists(root, endpoint, "report/loss_curve.png")
    if endpoint is None:
        from pathlib import Path

        assert (Path(root) / "report" / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = marker(root, endpoint, "evaluate")["metrics"]
    assert m["n_examples"] == N and m["finetuned"] == report["finetuned"]


def _parsed_fields(raw: str) -> dict:
    p = parse_response(raw, PromptConfig())
    return {"negation": p.output, "json_valid": p.json_valid, "schema_valid": p.schema_valid}


def test_metric_definitions():
    cfg = PromptConfig()
    src, gold = "A dog runs in the park.", "No animal is outside."
    answers = [
        ('{"original_sentence": "A dog runs in the park.", "negation": "No animal is outside."}', True),
        ('```json\n{"original_sentence": "A dog runs in the park.", "negation": "a DOG runs  in the park."}'
         '\n```', True),
        ('{"original_sentence": "A cat runs.", "negation": "Nobody runs."} and more', False),
        ("{'original_sentence': 'A dog runs in the park.', 'negation': 'No animal is outside.'}", True),
        ('{"original_sentence": "A dog runs in the park.", "negation": "No ani', False),
    ]
    records = [{"source": src, "target": gold}] * len(answers)
    generations = [Generation(text, 10 if stop else 16, stop) for text, stop in answers]
    parsed = [parse_response(g.text, cfg) for g in generations]
    m = score(records, generations, parsed, GenerationStats(seconds=2.0, new_tokens=0, batches=1))
    assert m["json_valid_rate"] == 3 / 5  # the Python-style dict is not JSON, the truncated one neither
    assert m["schema_valid_rate"] == 3 / 5
    # Field metrics use what the tolerant parser read (the Python-style dict too); validity is separate.
    assert m["original_match_rate"] == 3 / 5
    # normalized: case and inner whitespace ignored; the truncated answer holds the input only as
    # its "original_sentence", which is no copy
    assert m["copy_rate"] == 1 / 5
    assert m["gold_match_rate"] == 2 / 5  # the recovered Python dict still carries its negation
    assert m["recovered_python_dict_rate"] == 1 / 5
    assert m["eos_stop_rate"] == 3 / 5
    assert m["new_tokens"] == 62 and m["tokens_per_s"] == 31.0 and m["seconds_per_example"] == 0.4
    import sacrebleu

    hyps = [p.output or "" for p in parsed]
    assert m["chrf"] == round(sacrebleu.corpus_chrf(hyps, [[gold] * 5]).score, 2)


def test_copy_rate_counts_prose_that_repeats_the_input():
    """A model that never writes JSON but answers with its input must not score a perfect copy_rate."""
    cfg = PromptConfig()
    src = "Two men are playing chess."
    answers = ['The original sentence is "Two men are playing chess."',       # repeats it: copy
               "two MEN are playing   chess.",                              # the input itself: copy
               "Nobody is playing a game.",                                 # a negation in prose: no copy
               '{"original_sentence": "Two men are playing chess.", "neg',  # truncated echo: no copy
               '{"original_sentence": "Two men are playing chess.", "negation": "Two men are playing chess."}']
    records = [{"source": src, "target": "x"}] * len(answers)
    generations = [Generation(text, 10, True) for text in answers]
    parsed = [parse_response(g.text, cfg) for g in generations]
    m = score(records, generations, parsed, GenerationStats(seconds=1.0, new_tokens=0, batches=1))
    assert m["copy_rate"] == 3 / 5


def test_report_renders_without_base_and_without_loss(tmp_path):
    report = {"run_uri": "s3://b/run", "created_at": "now", "job_version": "0", "config_digest": "abc",
              "fingerprints": {"train": "t"}, "finetuned_model": "merged/", "settings": {"a": 1},
              "data": None, "n_examples": 1, "base": None,
              "finetuned": {"json_valid_rate": 1.0, "chrf": 50.0, "tokens_per_s": None},
              "train": dict.fromkeys(("steps", "tokens", "tokens_per_s", "train_seconds", "final_loss",
                                      "peak_gpu_memory_gb", "load_in_4bit", "compute_dtype")),
              "merge": {"enabled": False, "note": "merge.enabled: false"},
              "generation": {"do_sample": False, "temperature": None, "max_new_tokens": 8, "batch_size": 1,
                             "dtype": "float32", "device": "cpu"}}
    rows = [{"input": "a|b", "gold": "c", "finetuned": {"raw": "x\ny", "negation": None, "schema_valid": False}}]
    md = render_markdown(report, rows)
    assert "| metric | fine-tuned |" in md and "| valid JSON | 100.0% |" in md and "n/a" in md
    assert "a\\|b" in md and "merge.enabled: false." in md
    plot_loss([], tmp_path / "empty.png")
    assert (tmp_path / "empty.png").read_bytes()[:4] == b"\x89PNG"


def test_merge_disabled_evaluates_base_plus_adapter_and_predict_agrees(trained_run, tmp_path):  # noqa: F811
    root = str(tmp_path / "run")
    trained_run.seed(root, None)
    env = job_env(JOB_CACHE_DIR=tmp_path / "c")
    args = trained_run.args(root, "merge.enabled=false", "evaluate.compare_base=false", *EVAL_SETTINGS)
    plan = run_job("plan", *args[3:], env=env)
    assert plan.returncode == 0, plan.stderr
    assert "merge     disabled merge.enabled: false" in plan.stdout
    result = run_job(*args, env=env)
    assert result.returncode == 0, result.stderr
    assert "stage merge: skipped (merge.enabled: false)" in result.stderr
    assert not run_file_exists(root, None, "_stages/merge.json")
    assert not run_file_exists(root, None, "merged/config.json")

    report = json.loads(read_run_file(root, None, "report/report.json"))
    assert report["base"] is None and report["merge"]["enabled"] is False
    assert report["merge"]["max_logit_diff"] is None
    assert "adapter" in report["finetuned_model"]
    rows = read_jsonl(read_run_file(root, None, "report/predictions.jsonl"))
    assert len(rows) == N and all("base" not in r for r in rows)

    # `job predict` on the same inputs, model and batch size: the same template, batching and parser
    # give the very same answers (fp32 on CPU, greedy).
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("".join(r["input"] + "\n" for r in rows), encoding="utf-8")
    predicted = run_job("predict", "--model", trained_run.model_dir, "--adapter", f"{root}/adapter",
                        "--input", inputs, "--batch-size", 4, "--max-new-tokens", 16, env=env)
    assert predicted.returncode == 0, predicted.stderr
    lines = read_jsonl(predicted.stdout)
    assert [p["input"] for p in lines] == [r["input"] for r in rows]
    assert [p["raw"] for p in lines] == [r["finetuned"]["raw"] for r in rows]
    assert [p["valid"] for p in lines] == [r["finetuned"]["schema_valid"] for r in rows]



def test_evaluate_model_adapter_on_cpu_uses_the_4bit_base(trained_run, tmp_path):  # noqa: F811
    """evaluate.model=adapter: the base in 4 bits (bitsandbytes on the CPU) with adapter/, as trained,
    loaded separately after training (the DESIGN.md trap is about generating with the training model);
    the base for comparison is 4-bit too, and the report says which model was used and why."""
    root = str(tmp_path / "run")
    trained_run.seed(root, None)
    args = trained_run.args(root, "merge.enabled=false", "evaluate.model=adapter", "evaluate.max_examples=3",
                            "evaluate.batch_size=3", "evaluate.max_new_tokens=8")
    result = run_job(*args, env=job_env(JOB_CACHE_DIR=tmp_path / "c"))
    assert result.returncode == 0, result.stderr
    report = json.loads(read_run_file(root, None, "report/report.json"))
    assert report["model_choice"] == {"setting": "adapter", "four_bit": True, "reason": "evaluate.model=adapter"}
    assert report["finetuned_model"].startswith("the base model in 4 bits (nf4) with adapter/ applied, as trained")
    assert report["settings"]["evaluate.model"] == "adapter"
    assert report["finetuned"]["batch_size"] == 3 and report["finetuned"]["oom_halvings"] == 0
    assert report["base"]["batches"] == 1 and report["base"]["batch_size"] == 3

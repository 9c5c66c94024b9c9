"""The lm-evaluation-harness model ``minimamba`` (minimamba_moe/interop/harness.py), offline.

Needs the `eval` extra (lm-eval 0.4.13 or later); without it these tests skip, except the one that checks
the command says so. The tasks are local: YAML files over a JSONL file the test writes
(``dataset_path: json``), passed with ``--include_path``, run with HF_DATASETS_OFFLINE=1 and
HF_HUB_OFFLINE=1. The model is a small checkpoint trained in seconds (tests/conftest.py
``trained_ckpt``) on sentences the tasks ask about, so the accuracies are not chance. (The harness puts
its target delimiter, a space, between a question and each choice.)

Tolerances: the adapter and the direct computations below run the same float32 model; batching and
chunking change only the order of float32 sums (1e-4 absolute on a log-likelihood of tens of nats).
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from minimamba_moe.run.checkpoint import load_model
from minimamba_moe.run.tokenizer import load_tokenizer
from tests.helpers import hide_and_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_eval = pytest.mark.needs_extra("eval")  # skipped naming the extra without it (tests/conftest.py)

ROWS = [
    {"question": "the cat sat on the", "choices": ["mat", "dog", "sky"], "answer": 0,
     "text": "the cat sat on the mat.", "prompt": "the dog sat on", "target": " the log."},
    {"question": "the dog sat on the", "choices": ["cat", "log", "sat"], "answer": 1,
     "text": "the dog sat on the log. the cat", "prompt": "the cat sat", "target": " on the mat."},
    {"question": "the cat", "choices": ["sat", "log", "the"], "answer": 0,
     "text": "on the mat. the dog sat on the log. the cat sat on the mat.", "prompt": "the", "target": " cat"},
]
COMMON = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
TASKS = {
    "tiny_choice": 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
                   'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n',
    "tiny_rolling": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                    'metric_list:\n  - metric: bits_per_byte\n',
    "tiny_generate": 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{target}}"\n'
                     'generation_kwargs:\n  until: ["."]\n  max_gen_toks: 20\n  do_sample: false\n'
                     'metric_list:\n  - metric: exact_match\n',
}
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "tiny.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    for name, body in TASKS.items():
        (folder / f"{name}.yaml").write_text(f"task: {name}\n" + COMMON.format(data=data) + body)
    return folder


def instances(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@torch.no_grad()
def direct_logprob(model, ids: list[int], n_scored: int) -> tuple[float, bool]:
    """Sum of log-probabilities of the last ``n_scored`` tokens of ``ids`` from one forward's logits, and greedy."""
    logits = model(torch.tensor([ids[:-1]])).logits[0].double()
    logp = F.log_softmax(logits, dim=-1)[-n_scored:]
    target = torch.tensor(ids[-n_scored:])
    return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


PAIRS = [("the cat sat on the", " mat"), ("the dog ", "sat on the log"), ("", "the cat"), ("x", " y z"),
         ("the cat sat on the mat. the dog sat on the log. the", " cat sat")]


@needs_eval
def test_loglikelihood_is_the_sum_of_log_probs_over_the_harness_token_split(trained_ckpt, one_thread):
    from minimamba_moe.interop.harness import MinimambaLM

    lm = MinimambaLM(pretrained=str(trained_ckpt), device="cpu", batch_size=4)
    got = lm.loglikelihood(instances("loglikelihood", PAIRS), disable_tqdm=True)
    model, _ = load_model(trained_ckpt)
    for (ctx, cont), (ll, greedy) in zip(PAIRS, got):
        if ctx:
            ctx_ids, cont_ids = lm._encode_pair(ctx, cont)  # the harness's own split (TemplateLM)
        else:
            ctx_ids, cont_ids = [lm.prefix_token_id], lm.tok_encode(cont)
        want, want_greedy = direct_logprob(model.eval(), ctx_ids + cont_ids, len(cont_ids))
        assert abs(ll - want) < 1e-4 and greedy == want_greedy, (ctx, cont, ll, want)
    assert got[0][1], "the trained model should find ' mat', byte by byte, after 'the cat sat on the'"


@needs_eval
def test_batch_size_1_equals_batch_size_4_and_chunks_equal_one_pass(trained_ckpt, one_thread):
    from minimamba_moe.interop.harness import MinimambaLM

    one, four = (MinimambaLM(pretrained=str(trained_ckpt), device="cpu", batch_size=b) for b in (1, 4))
    a = one.loglikelihood(instances("loglikelihood", PAIRS), disable_tqdm=True)
    b = four.loglikelihood(instances("loglikelihood", PAIRS), disable_tqdm=True)
    assert [g for _, g in a] == [g for _, g in b]
    assert max(abs(x - y) for (x, _), (y, _) in zip(a, b)) < 1e-4
    docs = [(r["text"],) for r in ROWS] + [("the cat sat on the mat. " * 6,), ("",)]
    rolling = {b: lm.loglikelihood_rolling(instances("loglikelihood_rolling", docs), disable_tqdm=True)
               for b, lm in ((1, one), (4, four))}
    chunked = MinimambaLM(pretrained=str(trained_ckpt), device="cpu", batch_size=4, max_length=7)
    rolling["chunks of 7"] = chunked.loglikelihood_rolling(instances("loglikelihood_rolling", docs), disable_tqdm=True)
    model, _ = load_model(trained_ckpt)
    tok = load_tokenizer("bytes")
    direct = [direct_logprob(model.eval(), [one.prefix_token_id] + tok.encode(d), len(tok.encode(d)))[0] if d else 0.0
              for (d,) in docs]
    for name, values in rolling.items():
        assert max(abs(x - y) for x, y in zip(values, direct)) < 1e-4, (name, values, direct)


@needs_eval
def test_a_transformer_gets_the_harness_rolling_windows_and_a_context_cut_to_its_cache(tmp_path, one_thread):
    """Attention layers hold max_seq_len positions: rolling windows of that size (each scored by a forward over
    that window alone), a long context cut on the left, generation kept inside the cache."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from minimamba_moe.config import ModelConfig
    from minimamba_moe.interop.harness import MinimambaLM
    from minimamba_moe.model import Model
    from minimamba_moe.run.checkpoint import save_model

    torch.manual_seed(0)
    config = ModelConfig.from_preset("transformer-25m", vocab_size=256, d_model=32, n_layer=2, n_head=2, d_ff=64,
                                     max_seq_len=16)
    save_model(Model(config), tmp_path / "tf", tokenizer="bytes")
    lm = MinimambaLM(pretrained=str(tmp_path / "tf"), device="cpu", batch_size=2)
    doc = "the cat sat on the mat, and then once more."
    [got] = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(doc,)]), disable_tqdm=True)
    pairs = [make_disjoint_window(w) for w in get_rolling_token_windows(list(doc.encode()), 10, 16, 1)]
    assert len(pairs) == 3
    assert abs(got - sum(direct_logprob(lm.model, c + t, len(t))[0] for c, t in pairs)) < 1e-4
    ctx, cont = lm._encode_pair("x" * 40, " the cat")
    [(ll, _)] = lm.loglikelihood(instances("loglikelihood", [("x" * 40, " the cat")]), disable_tqdm=True)
    assert abs(ll - direct_logprob(lm.model, (ctx + cont)[-17:], len(cont))[0]) < 1e-4
    [text] = lm.generate_until(instances("generate_until", [("x" * 40, {"until": [], "max_gen_toks": 30})]),
                               disable_tqdm=True)
    assert isinstance(text, str)  # 16 tokens at most: one of the prompt, 15 fed back, none past the cache
    with pytest.raises(ValueError, match="max_length=32: this model has attention layers"):
        MinimambaLM(pretrained=str(tmp_path / "tf"), device="cpu", max_length=32)


@needs_eval
def test_generate_until_is_greedy_sample_py_output(trained_ckpt, one_thread, capsys):
    sys.path.insert(0, ROOT)
    import sample
    from minimamba_moe.interop.harness import MinimambaLM
    from minimamba_moe.run.cli import run_main

    lm = MinimambaLM(pretrained=str(trained_ckpt), device="cpu")
    for prompt in ("the dog sat on", "the"):
        code = run_main(sample.main, [str(trained_ckpt), "--prompt", prompt, "--temperature", "0",
                                      "--max_new_tokens", "30"], "sample.py", (sample.UsageError,), sample.ERRORS)
        printed = capsys.readouterr().out
        assert code == 0 and printed.startswith(prompt)
        [free, stopped] = lm.generate_until(instances("generate_until", [
            (prompt, {"until": [], "max_gen_toks": 30}), (prompt, {"until": ["."], "max_gen_toks": 30})]),
            disable_tqdm=True)
        assert prompt + free + "\n" == printed
        assert "." in free and stopped == free.split(".")[0]  # cut before the stop sequence


@needs_eval
def test_the_wrapper_runs_local_tasks_through_the_harness_cli(trained_ckpt, tasks, tmp_path):
    """`python -m minimamba_moe.interop.harness` with the harness's own options, offline: the three request
    types, results and samples written where --output_path says; the numbers are the model's."""
    r = subprocess.run([sys.executable, "-m", "minimamba_moe.interop.harness", "--model", "minimamba",
                        "--model_args", f"pretrained={trained_ckpt}", "--tasks", ",".join(TASKS),
                        "--include_path", str(tasks), "--num_fewshot", "0", "--limit", "3", "--batch_size", "2",
                        "--device", "cpu", "--output_path", str(tmp_path / "results"), "--log_samples"],
                       cwd=tmp_path, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    [results_file] = (tmp_path / "results").rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    assert results["tiny_choice"]["acc,none"] == 1.0  # the sentences it was trained on
    model, _ = load_model(trained_ckpt)
    tok = load_tokenizer("bytes")
    nll = -sum(direct_logprob(model.eval(), [10] + tok.encode(row["text"]), len(row["text"]))[0] for row in ROWS)
    bpb = nll / math.log(2) / sum(len(row["text"].encode()) for row in ROWS)
    assert abs(results["tiny_rolling"]["bits_per_byte,none"] - bpb) < 1e-4
    assert 0 <= results["tiny_generate"]["exact_match,none"] <= 1
    assert {p.name.split("_20")[0] for p in (tmp_path / "results").rglob("samples_*.jsonl")} == \
        {f"samples_{t}" for t in TASKS}


@needs_eval
def test_simple_evaluate_with_an_adapter_instance(trained_ckpt, one_thread, tasks):
    """The harness's documented Python route for an external model: simple_evaluate(model=<an LM instance>)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from minimamba_moe.interop.harness import MinimambaLM

    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    out = lm_eval.simple_evaluate(model=MinimambaLM(pretrained=str(trained_ckpt), device="cpu", batch_size=3),
                                  tasks=["tiny_choice"], task_manager=manager)
    assert out["results"]["tiny_choice"]["acc,none"] == 1.0
    by_name = lm_eval.simple_evaluate(model="minimamba", model_args=f"pretrained={trained_ckpt}", device="cpu",
                                      tasks=["tiny_choice"], task_manager=manager)  # registered on import
    assert by_name["results"]["tiny_choice"] == out["results"]["tiny_choice"]


@needs_eval
def test_bad_model_args_one_line(trained_ckpt, one_thread, tasks, tmp_path, capsys):
    from minimamba_moe.interop import harness

    code = harness.main(["--model", "minimamba", "--model_args", f"pretrained={tmp_path / 'nowhere'}",
                         "--tasks", "tiny_choice", "--include_path", str(tasks), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]  # through the command: one line after the harness's own log lines
    assert last.startswith("python -m minimamba_moe.interop.harness: error: No checkpoint at "), err
    for kwargs, needle in [({"pretrained": str(tmp_path)}, "is a folder without a checkpoint"),
                           ({"colour": "blue"}, "Unknown model_args for minimamba: colour"),
                           ({"dtype": "float8"}, "dtype float8: expected auto, float32"),
                           ({"batch_size": "auto"}, "batch size auto: give a number"),
                           ({"batch_size": 0}, "batch size 0: expected at least 1"),
                           ({"max_length": -5}, "max_length=-5, max_gen_toks=256: expected positive")]:
        with pytest.raises(harness.ERRORS, match=needle):
            harness.MinimambaLM(**{"pretrained": str(trained_ckpt), "device": "cpu", **kwargs})


def test_without_the_eval_extra_the_command_says_what_to_install(tmp_path):
    r = subprocess.run([*hide_and_run("lm_eval", "-m minimamba_moe.interop.harness"), "--model", "minimamba",
                        "--tasks", "hellaswag"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and not r.stdout, r.stderr
    assert r.stderr.strip().splitlines() == [
        "python -m minimamba_moe.interop.harness: error: this command needs lm-evaluation-harness: "
        "pip install 'minimamba-moe[eval]' (lm-eval 0.4.13 or later)."], r.stderr

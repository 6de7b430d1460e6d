"""The lm-eval stage: our adapter against lm-eval's own `hf` model, and the stage end to end.

The reference: the template's GPT with an identity BitLinear (plain float weights) converted
into a Hugging Face GPT2LMHeadModel, scored by lm-eval's HFLM with a tokenizer built by the
Hugging Face `tokenizers` library from the same GPT-2 files. Every metric must agree.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from harness.attempt import Prepared, run_submission
from harness.data import evals
from harness.record import Status
from harness.regions import splice
from harness.runners.base import StageRun, StageSpec
from harness.runners.local import LocalRunner
from harness.runtime import lmeval_report
from harness.runtime.tokenizer import EOT, tokenizer_files
from harness.stages import lmeval
from harness.stages.base import StageOutcome
from harness.submission import Submission
from harness.task import TaskSpec, load_task
from tests.conftest import PYTHON, REPO

pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

# The task's lm-eval metrics, as its task.toml declares them.
HEADLINE = lmeval.headline(load_task())


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path_factory: pytest.TempPathFactory,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`datasets` caches what it loads: here, never in the user's home, and offline."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE",
                        tmp_path_factory.getbasetemp() / "hf-datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)

IDENTITY = '''
def weight_quant(weight):
    return weight, 1.0


def activation_quant(x):
    return x, 1.0


class BitLinear(nn.Module):
    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)
'''
# Trains and builds like IDENTITY, but fails once it is asked to score.
FAILS_IN_EVAL = IDENTITY.replace("        return F.linear(x, self.weight, self.bias)",
                                 "        if not self.training:\n"
                                 "            raise RuntimeError('no eval for me')\n"
                                 "        return F.linear(x, self.weight, self.bias)")
ARGS = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64, "bias": False,
        "vocab_size": 50304, "dropout": 0.0}
TASKS = [t.harness_task for t in evals.TASKS]


def make_attempt(root: Path, task: TaskSpec, region: str | None,
                 model_args: dict[str, Any] = ARGS) -> Path:
    """An attempt folder: a spliced template and a pretrain/ckpt.pt of random weights."""
    from harness.runtime.spliced import load_spliced

    root.mkdir(parents=True, exist_ok=True)
    text = task.template_text() if region is None else splice(task.template_text(),
                                                              {"bitlinear": region})
    (root / "custom_pretrain.py").write_text(text)
    module = load_spliced(root / "custom_pretrain.py")
    torch.manual_seed(0)
    model = module.GPT(module.GPTConfig(**model_args))
    with torch.no_grad():  # larger than the template's init: peaked, distinct predictions
        for name, p in model.named_parameters():
            p.normal_(1.0 if ".ln_" in name and name.endswith("weight") else 0.0, 0.1)
    (root / "pretrain").mkdir(exist_ok=True)
    # What the template's evaluation needs to rebuild training's validation windows.
    config = {"batch_size": 2, "block_size": model_args["block_size"], "eval_iters": 3}
    torch.save({"model": model.state_dict(), "model_args": dict(model_args), "config": config,
                "iter_num": 0, "val_loss": 9.0, "world_size": 2}, root / "pretrain" / "ckpt.pt")
    return root


def to_hf(model: torch.nn.Module, args: dict[str, Any]) -> Any:
    """The template's float GPT as a Hugging Face GPT2LMHeadModel (Conv1D: transposed)."""
    config = transformers.GPT2Config(
        vocab_size=args["vocab_size"], n_positions=args["block_size"], n_embd=args["n_embd"],
        n_layer=args["n_layer"], n_head=args["n_head"], activation_function="gelu",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
        bos_token_id=EOT, eos_token_id=EOT, tie_word_embeddings=True)
    hf = transformers.GPT2LMHeadModel(config).eval()
    ours = model.state_dict()
    state = {}
    for key, value in hf.state_dict().items():
        if key in ours:
            conv1d = key.startswith("transformer.h.") and key.endswith(".weight") \
                and ".ln_" not in key
            state[key] = ours[key].t().contiguous() if conv1d else ours[key].clone()
        else:  # bias=False: the template has no biases, GPT-2 has zeros
            assert key.endswith(".bias"), key
            state[key] = torch.zeros_like(value)
    hf.load_state_dict(state)
    return hf


def hf_tokenizer() -> Any:
    """GPT-2 BPE by the `tokenizers` library from the same two files (not GPT2TokenizerFast,
    which in transformers 5 silently builds a one-token vocabulary from them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    files = tokenizer_files()
    tok = Tokenizer(models.BPE.from_file(str(files["encoder.json"]), str(files["vocab.bpe"])))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        unk_token="<|endoftext|>")


@pytest.fixture(scope="module")
def smoke_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from harness.data.smoke import prepare_smoke

    corpus = tmp_path_factory.mktemp("corpus")
    prepare_smoke(corpus, max_tokens=150_000)
    return corpus


@pytest.fixture(scope="module")
def smoke_evals(tmp_path_factory: pytest.TempPathFactory, smoke_corpus: Path) -> Path:
    corpus = smoke_corpus
    out = tmp_path_factory.mktemp("evals")
    evals.prepare_smoke_evals(out, corpus, docs=24)
    return out


# --- pieces --------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_len", [1, 3, 64])
def test_rolling_windows_match_lm_eval(max_len: int) -> None:
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from harness.runtime.lmeval_model import rolling_windows

    for n in (0, 1, 2, 3, 4, 63, 64, 65, 128, 129, 300):
        tokens = list(range(100, 100 + n))
        expected = [make_disjoint_window(w)
                    for w in get_rolling_token_windows(tokens, EOT, max_len, 1)]
        assert rolling_windows(tokens, EOT, max_len) == expected, (n, max_len)


def test_plan_batches_cover_each_request_once_within_budget() -> None:
    from harness.runtime.lmeval_model import plan_batches

    lengths = [5, 64, 1, 33, 64, 7, 7, 20, 2]
    batches = plan_batches(lengths, 70)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 70 or len(b) == 1
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)


class NextTokenModel(torch.nn.Module):
    """A bigram model that favours token t + 1 after t: its log-likelihoods are known."""

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, None]:
        vocab = torch.arange(50304, dtype=torch.float32)
        return -0.01 * (vocab - (idx[..., None] + 1).float()).abs(), None


def bigram_logprob(sequence: list[int]) -> float:
    logits = NextTokenModel()(torch.tensor([sequence[:-1]]))[0][0]
    logprobs = torch.log_softmax(logits, dim=-1)
    return float(sum(logprobs[i, t] for i, t in enumerate(sequence[1:])))


def test_loglikelihood_tokens_are_exact_and_greedy_is_exact() -> None:
    from harness.runtime.lmeval_model import GPTLM

    lm = GPTLM(NextTokenModel(), max_length=8, device=torch.device("cpu"), batch_tokens=10)
    requests = [
        ((None, None), [5, 6, 7], [8, 9]),  # greedy: every token is the argmax
        ((None, None), [5, 6, 7], [8, 10]),  # one token is not
        ((None, None), list(range(20, 40)), [40]),  # context cut to the last 8 tokens
        ((None, None), [0], list(range(1, 9))),  # a full window
    ]
    got = lm._loglikelihood_tokens(requests)
    assert [g for _, g in got] == [True, False, True, True]
    for (_, context, continuation), (logprob, _) in zip(requests, got, strict=True):
        full = (context + continuation)[-9:]
        tail = bigram_logprob(full[-(len(continuation) + 1):])
        assert logprob == pytest.approx(tail, rel=1e-6)


def test_model_errors_are_the_models() -> None:
    from harness.runtime.lmeval_model import GPTLM, ModelError

    class Broken(torch.nn.Module):
        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return torch.zeros(idx.shape[0], idx.shape[1], 10)

    lm = GPTLM(Broken(), max_length=8, device=torch.device("cpu"))
    with pytest.raises(ModelError, match="expected"):
        lm._loglikelihood_tokens([(None, [1], [2])])


def test_our_tokens_are_the_hf_tokenizers() -> None:
    from harness.runtime.lmeval_model import GPTLM

    lm = GPTLM(NextTokenModel(), max_length=8, device=torch.device("cpu"))
    hf = hf_tokenizer()
    for text in ("Question: What is 2+2?\nAnswer:", " leading", "tabs\t\tand  spaces ",
                 "café 日本 😀", "a<|endoftext|>b", ""):
        assert lm.tok_encode(text) == hf.encode(text), text


# --- against lm-eval's hf model --------------------------------------------------------------

@pytest.mark.parametrize("bias", [False, True])
def test_converted_model_gives_the_same_logits(tmp_path: Path, task: TaskSpec,
                                               bias: bool) -> None:
    from harness.runtime.lmeval_model import build_model, load_checkpoint
    from harness.runtime.spliced import load_spliced

    args = {**ARGS, "bias": bias}
    attempt = make_attempt(tmp_path, task, IDENTITY, args)
    ours = build_model(load_spliced(attempt / "custom_pretrain.py"),
                       load_checkpoint(attempt / "pretrain" / "ckpt.pt"))
    hf = to_hf(ours, args)
    idx = torch.randint(0, 50257, (3, args["block_size"]),
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(idx)[0], hf(idx).logits
    assert a.abs().max() > 1.0  # not a degenerate model
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _numbers(results: dict[str, Any]) -> dict[tuple[str, str], float]:
    return {(t, k): v for t in TASKS for k, v in results["results"][t].items()
            if isinstance(v, float | int) and not isinstance(v, bool)}


@pytest.mark.slow
def test_every_metric_equals_lm_evals_hf_model(tmp_path: Path, task: TaskSpec,
                                               smoke_evals: Path) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from harness.runtime.lmeval_model import GPTLM, build_model, load_checkpoint
    from harness.runtime.spliced import load_spliced

    attempt = make_attempt(tmp_path, task, IDENTITY)
    ours = build_model(load_spliced(attempt / "custom_pretrain.py"),
                       load_checkpoint(attempt / "pretrain" / "ckpt.pt"))
    reference = HFLM(pretrained=to_hf(ours, ARGS), tokenizer=hf_tokenizer(), device="cpu",
                     batch_size=16)
    adapter = GPTLM(ours, max_length=ARGS["block_size"], device=torch.device("cpu"))
    manager = TaskManager(include_path=str(smoke_evals / evals.YAML_DIR),
                          include_defaults=False)
    run = {"tasks": TASKS, "task_manager": manager, "bootstrap_iters": 200, "log_samples": True}
    expected, got = simple_evaluate(model=reference, **run), simple_evaluate(model=adapter, **run)

    want, have = _numbers(expected), _numbers(got)
    assert want.keys() == have.keys() and len(want) >= 18
    for key, value in want.items():
        assert have[key] == pytest.approx(value, rel=1e-4, abs=1e-12), key
    for name in TASKS:  # request by request: log-likelihood and the greedy flag
        for a, b in zip(expected["samples"][name], got["samples"][name], strict=True):
            for (ll_a, *greedy_a), (ll_b, *greedy_b) in zip(
                    [r[0] if isinstance(r[0], tuple) else r for r in a["resps"]],
                    [r[0] if isinstance(r[0], tuple) else r for r in b["resps"]], strict=True):
                assert ll_b == pytest.approx(ll_a, rel=1e-4) and greedy_a == greedy_b


# --- the stage -----------------------------------------------------------------------------

def _run(tmp_path: Path, returncode: int | None, *, error: dict[str, str] | None = None,
         report: dict[str, Any] | None = None, timed_out: bool = False) -> StageOutcome:
    out = tmp_path / "out"
    out.mkdir(parents=True)
    if error is not None:
        (out / lmeval.ERROR_FILE).write_text(json.dumps(error))
    if report is not None:
        (out / lmeval.EVAL_FILE).write_text(json.dumps(report))
    run = StageRun(returncode, returncode is not None, timed_out, 1.0, out / "o", out / "e")
    return lmeval.collect(run, out, list(HEADLINE))


def test_headline_metrics_are_the_tasks_lm_eval_metrics(task: TaskSpec) -> None:
    assert set(HEADLINE) == {m.name for m in task.metrics if m.stage == lmeval.STAGE}
    assert {name for name, _ in HEADLINE.values()} == set(evals.TASK_NAMES)
    assert HEADLINE["hellaswag"] == ("hellaswag", "acc_norm")


def test_a_metric_source_that_is_no_lm_eval_task_is_refused(task: TaskSpec) -> None:
    from harness.errors import UserError

    for bad in ("", "wikitext", "mmlu/acc"):
        metrics = tuple(dataclasses.replace(m, source=bad) if m.name == "piqa" else m
                        for m in task.metrics)
        with pytest.raises(UserError, match="metric piqa: source") as e:
            lmeval.headline(dataclasses.replace(task, metrics=metrics))
        assert "TASK one of" in (e.value.fix or "")


def test_the_stage_asks_the_script_for_the_tasks_metrics(tmp_path: Path) -> None:
    spec = lmeval.build(script=tmp_path / "eval_lm.py", attempt_dir=tmp_path,
                        checkpoint=tmp_path / "ckpt.pt", evals=tmp_path / "evals",
                        out_dir=tmp_path / "out", settings=lmeval.EvalSettings(), timeout_s=1.0,
                        metrics=HEADLINE)
    asked = [a.removeprefix("--metric=") for a in spec.argv if a.startswith("--metric=")]
    assert asked == [f"{k}={t}/{m}" for k, (t, m) in HEADLINE.items()]


def test_collect_sorts_failures_by_whose_they_are(tmp_path: Path) -> None:
    good = {"format": lmeval.FORMAT, "metrics": dict.fromkeys(HEADLINE, 50.0)}
    assert _run(tmp_path / "a", 0, report=good).status is Status.SUCCEEDED
    nan = {**good, "metrics": {**good["metrics"], "piqa": math.nan}}
    got = _run(tmp_path / "b", 0, report=nan)
    assert got.status is Status.FAILED_SUBMISSION and "piqa" in got.reason
    got = _run(tmp_path / "c", 1, error={"kind": "submission", "message": "tb\nValueError: x"})
    assert got.status is Status.FAILED_SUBMISSION and got.reason == "lm-eval: ValueError: x"
    assert _run(tmp_path / "d", 1, error={"kind": "infra", "message": "m"}).status \
        is Status.FAILED_INFRA
    assert _run(tmp_path / "e", None).status is Status.FAILED_INFRA
    assert _run(tmp_path / "f", None, timed_out=True).status is Status.FAILED_INFRA
    assert _run(tmp_path / "g", 0, report={"format": "other"}).status is Status.FAILED_INFRA


def test_a_forward_that_raises_is_the_submissions_failure(tmp_path: Path, task: TaskSpec,
                                                          smoke_evals: Path) -> None:
    from harness.runtime.lmeval_run import EvalRequest, SubmissionFailure, evaluate

    attempt = make_attempt(tmp_path / "attempt", task, FAILS_IN_EVAL)
    request = EvalRequest(script=attempt / "custom_pretrain.py",
                          checkpoint=attempt / "pretrain" / "ckpt.pt", evals=smoke_evals,
                          out=tmp_path / "out" / "eval.json", limit=2, bootstrap_iters=10,
                          metrics=HEADLINE)
    with pytest.raises(SubmissionFailure, match="no eval for me"):
        evaluate(request)
    assert not request.out.exists()


@dataclasses.dataclass
class TrainedRunner:
    """Pretrain replaced by a ready checkpoint (training is tested elsewhere); every other
    stage runs for real through the local runner."""

    checkpoint_from: Path
    reported_val_loss: float
    name: str = "local+fake-pretrain"

    def run(self, spec: StageSpec) -> StageRun:
        if spec.name != "pretrain":
            return LocalRunner().run(spec)
        out = spec.log_dir
        out.mkdir(parents=True, exist_ok=True)
        (out / "ckpt.pt").write_bytes(self.checkpoint_from.read_bytes())
        v = self.reported_val_loss
        (out / "final.json").write_text(json.dumps({"val_loss": v,
                                                    "rank_param_checksums": [1.5, 1.5]}))
        (out / "metrics.jsonl").write_text(json.dumps({"step": 0, "val_loss": v}) + "\n")
        for log in ("stdout.log", "stderr.log"):
            (out / log).write_text("")
        return StageRun(0, True, False, 0.1, out / "stdout.log", out / "stderr.log")


def _true_val_loss(trained: Path, corpus: Path) -> float:
    """The checkpoint's val_loss as the eval stage computes it, here in this process."""
    from harness.runtime.lmeval_run import EvalRequest, load, score_val_loss

    loaded = load(EvalRequest(script=trained / "custom_pretrain.py",
                              checkpoint=trained / "pretrain" / "ckpt.pt", evals=corpus,
                              out=trained / "unused.json", device="cpu"))
    return float(score_val_loss(loaded, corpus)["value"])


def _fake_pretrain_attempt(tmp_path: Path, task: TaskSpec, smoke_evals: Path,
                           smoke_corpus: Path, offset: float) -> tuple[Any, Any, float]:
    import shutil

    # The template's own ternary BitLinear, untrained: numbers are poor but must be finite.
    trained = make_attempt(tmp_path / "trained", task, None)
    data = tmp_path / "data"
    shutil.copytree(smoke_evals, data / "evals")  # copied: the YAMLs are rewritten per run
    shutil.copytree(smoke_corpus, data / "tiny")
    true = _true_val_loss(trained, data / "tiny")
    scale = dataclasses.replace(task.scale("smoke"), dataset="tiny",
                                stages=("pretrain", lmeval.STAGE))
    sub = Submission(kind="directory", source=tmp_path, regions={}, meta={}, sha256="0" * 64,
                     name="ternary")
    prepared = Prepared(sub, task.template_text(), "")
    runner = TrainedRunner(trained / "pretrain" / "ckpt.pt", reported_val_loss=true + offset)
    result, paths = run_submission(prepared, task, scale, runs_dir=tmp_path / "runs", data=data,
                                runner=runner)
    return result, paths, true


@pytest.mark.slow
def test_a_val_loss_that_training_misreports_invalidates_the_attempt(
        tmp_path: Path, task: TaskSpec, smoke_evals: Path, smoke_corpus: Path) -> None:
    # Training claims 0.5 less than the checkpoint scores: a forged or broken record.
    result, _paths, true = _fake_pretrain_attempt(tmp_path, task, smoke_evals, smoke_corpus,
                                                 offset=-0.5)
    assert result.status == "rule_violation"
    assert result.reason.startswith("rule violation (cross-check): val_loss from pretrain ")
    assert f"recomputation from the checkpoint ({true:.6g})" in result.reason
    assert result.metrics == {}


@pytest.mark.slow
def test_attempt_runs_the_stage_and_merges_its_metrics(tmp_path: Path, task: TaskSpec,
                                                       smoke_evals: Path,
                                                       smoke_corpus: Path) -> None:
    # Within the tolerance (bf16, compiled against eager) training's number is accepted.
    result, paths, true = _fake_pretrain_attempt(tmp_path, task, smoke_evals, smoke_corpus,
                                                 offset=0.004)
    assert result.status == "succeeded", result.reason
    record = json.loads(paths.record_path.read_text())
    assert sorted(record["metrics"]) == sorted(["val_loss", *HEADLINE])
    # The official val_loss is the eval stage's, from the checkpoint; training's is kept.
    assert record["metrics"]["val_loss"] == pytest.approx(true, abs=1e-6)
    assert record["stages"]["pretrain"]["trained_metrics"]["val_loss"] == true + 0.004
    assert record["stages"][lmeval.STAGE]["val_loss"]["windows"] == 3 * 2 * 2
    assert record["stages"][lmeval.STAGE]["lowbit_audit"]["problems"] == []
    assert all(math.isfinite(v) for v in record["metrics"].values())
    stage = record["stages"][lmeval.STAGE]
    assert stage["lm_eval_version"] == __import__("importlib.metadata").metadata.version(
        "lm_eval")
    assert stage["settings"]["limit"] == lmeval.SMOKE_LIMIT
    report = json.loads((paths.root / lmeval.STAGE / lmeval.EVAL_FILE).read_text())
    assert "percent" in report["convention"]
    _check_samples(paths.root / lmeval.STAGE, report)
    assert f"{lmeval.STAGE}/{lmeval_report.SAMPLES_FILE}" in record["artifacts"]

    # `harness eval` re-scores the same attempt from the command line.
    proc = subprocess.run([PYTHON, "-m", "harness", "eval", str(paths.root), "--evals",
                           str(tmp_path / "data" / "evals"), "--limit", "2",
                           "--bootstrap-iters", "10",
                           "--out", str(tmp_path / "manual")], capture_output=True, text=True,
                          cwd=REPO, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "succeeded" in proc.stdout and "wikitext2_ppl" in proc.stdout
    assert json.loads((tmp_path / "manual" / "eval.json").read_text())["settings"]["limit"] == 2


def _check_samples(stage_dir: Path, report: dict[str, Any]) -> None:
    """samples.jsonl holds every scored document; the accuracies are their mean, in percent."""
    rows = [json.loads(line) for line in (stage_dir / lmeval_report.SAMPLES_FILE).read_text()
            .splitlines()]
    assert len(rows) == len(evals.TASKS) * lmeval.SMOKE_LIMIT == report["samples_lines"]
    for ours, (name, metric) in HEADLINE.items():
        if metric in lmeval_report.PERCENT_METRICS:
            values = [r[metric] for r in rows if r["task"] == name]
            assert report["metrics"][ours] == pytest.approx(100 * sum(values) / len(values))

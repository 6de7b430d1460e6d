"""lm-eval's model interface over the template's GPT: log-likelihoods from our checkpoints.

`GPTLM` is a `lm_eval.api.model.TemplateLM`: lm-eval's own `loglikelihood` splits each
(context, continuation) pair into tokens (trailing spaces of the context move to the
continuation; an empty context gets the end-of-text token), and we score the token pairs.
Scoring follows lm-eval's `hf` model: the last max_length + 1 tokens of context +
continuation, the continuation's log-probabilities summed, and `is_greedy` when every
continuation token is the argmax. Rolling log-likelihoods (perplexity) use disjoint windows
of max_length predictions, each with as much context as fits, as lm-eval does.

The model is the SPLICED template's own `GPT` (the submission's BitLinear included), built
from the checkpoint's model_args and loaded strictly; tokens come from the offline GPT-2
encoding, with "<|endoftext|>" in text read as the special token, as Hugging Face's GPT-2
tokenizer does under lm-eval.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM  # type: ignore[import-untyped,unused-ignore]

from harness.runtime.tokenizer import EOT, VOCAB_SIZE, gpt2_encoding

Tokens = list[int]
# lm-eval's request after tokenization: ((context, continuation) strings, tokens, tokens).
TokenRequest = tuple[Any, Tokens, Tokens]

CPU_BATCH_TOKENS = 4096
# On CUDA, larger batches stop paying off well before memory runs out (H200: 64k tokens of
# GPT-2 Medium in one pass); padding to a batch's longest request costs at most 1 - MIN_FILL.
CUDA_MAX_BATCH_TOKENS = 65536
MIN_FILL = 0.75
# Continuation positions whose float32 log-softmax is taken at once (memory: x vocab x 4).
SCORE_CHUNK = 4096
# Bytes per input token a forward pass needs on the GPU, per vocabulary entry (the logits:
# 2 bytes in bf16, 4 in float32, plus headroom) and per embedding dimension (activations).
# Measured on an H200, GPT-2 Medium: 314 KB per token in bf16, 418 KB in float32.
_BYTES_PER_VOCAB = 6
_BYTES_PER_EMBD = 64


class ModelError(RuntimeError):
    """The submission's model failed (raised, or returned the wrong shape)."""


def rolling_windows(tokens: Tokens, prefix: int, max_len: int) -> list[tuple[Tokens, Tokens]]:
    """(context, continuation) windows that predict every token of `tokens` exactly once.

    The first window predicts up to max_len tokens after `prefix`; each later one predicts
    the next max_len (fewer at the end) and takes the max_len + 1 - len(continuation)
    tokens before them as context, so context + continuation is a full window.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be positive, got {max_len}")
    windows: list[tuple[Tokens, Tokens]] = []
    done = 0
    while done < len(tokens):
        end = min(done + max_len, len(tokens))
        context = [prefix] if done == 0 else tokens[max(0, end - max_len - 1):done]
        windows.append((context, tokens[done:end]))
        done = end
    return windows


def plan_batches(lengths: Sequence[int], budget: int,
                 min_fill: float = MIN_FILL) -> list[list[int]]:
    """Indices in descending length, cut into batches of at most `budget` padded tokens.

    Longest first, as lm-eval does: memory trouble shows at once. A batch also ends where a
    request is shorter than `min_fill` of the batch's width, so padding stays a small share.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches:
            # The first index of a batch is its longest: it sets the padded width.
            batch, width = batches[-1], lengths[batches[-1][0]]
            if (len(batch) + 1) * width <= budget and lengths[i] >= min_fill * width:
                batch.append(i)
                continue
        batches.append([i])
    return batches


def default_batch_tokens(device: torch.device, vocab_size: int, n_embd: int,
                         n_layer: int) -> int:
    """A token budget per forward pass: fixed on CPU, a share of free memory on CUDA."""
    if device.type != "cuda":
        return CPU_BATCH_TOKENS
    free, _ = torch.cuda.mem_get_info(device)
    per_token = _BYTES_PER_VOCAB * vocab_size + _BYTES_PER_EMBD * n_embd + 16 * n_layer
    return max(CPU_BATCH_TOKENS, min(CUDA_MAX_BATCH_TOKENS, int(0.4 * free) // per_token))


class GPTLM(TemplateLM):  # type: ignore[misc]
    """lm-eval's LM over a causal model whose forward(idx) returns (logits, ...) or logits."""

    backend = "causal"

    def __init__(self, model: torch.nn.Module, *, max_length: int, device: torch.device,
                 autocast_dtype: torch.dtype | None = None, batch_tokens: int = 0) -> None:
        super().__init__()
        self.model = model.to(device).eval()
        self._max_length = max_length
        self._torch_device = device
        self.autocast_dtype = autocast_dtype
        self.batch_tokens = max(batch_tokens or CPU_BATCH_TOKENS, max_length)
        self._encoding = gpt2_encoding()
        # For the record: forward passes, and real vs padded input tokens they read.
        self.stats: dict[str, float] = {"forward_passes": 0, "tokens": 0, "padded_tokens": 0,
                                        "score_s": 0.0}

    # --- what lm-eval asks of a model ---------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return EOT

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._torch_device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> Tokens:
        tokens: Tokens = self._encoding.encode(string, allowed_special="all")
        return tokens

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        text: str = self._encoding.decode(list(tokens))
        return text

    def generate_until(self, requests: Any, disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError("GPTLM scores log-likelihoods only; no generation tasks")

    def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> list[float]:
        windows: list[TokenRequest] = []
        owners: list[int] = []
        for i, request in enumerate(requests):
            (text,) = request.args
            for context, continuation in rolling_windows(self.tok_encode(text),
                                                         self.prefix_token_id, self.max_length):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows), strict=True):
            totals[owner] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def _loglikelihood_tokens(self, requests: Sequence[TokenRequest],
                              disable_tqdm: bool = False, **kwargs: Any
                              ) -> list[tuple[float, bool]]:
        t0 = time.perf_counter()
        inputs = [self._model_input(context, continuation)
                  for _, context, continuation in requests]
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for batch in plan_batches([len(inp) for inp, _ in inputs], self.batch_tokens):
            for i, scored in zip(batch, self._score([inputs[i] for i in batch]), strict=True):
                results[i] = scored
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], scored)
        self.stats["score_s"] += time.perf_counter() - t0
        done = [r for r in results if r is not None]
        assert len(done) == len(requests), "every request is in exactly one batch"
        return done

    # --- scoring ------------------------------------------------------------------------------

    def _model_input(self, context: Tokens, continuation: Tokens) -> tuple[Tokens, Tokens]:
        """The model's input (at most max_length tokens, cut from the left) and the targets."""
        if not context or not continuation:
            raise ValueError("lm-eval gave an empty context or continuation")
        if len(continuation) > self.max_length:
            raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the "
                             f"model's {self.max_length}-token context")
        whole = (context + continuation)[-(self.max_length + 1):]
        return whole[:-1], continuation

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _score(self, batch: Sequence[tuple[Tokens, Tokens]]) -> Iterator[tuple[float, bool]]:
        width = max(len(inp) for inp, _ in batch)
        # Right padding: a causal model's logits at real positions never see the pad.
        idx = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (inp, _) in enumerate(batch):
            idx[row, :len(inp)] = torch.tensor(inp, dtype=torch.long)
        logits = self._forward(idx.to(self.device))
        self.stats["forward_passes"] += 1
        self.stats["tokens"] += sum(len(inp) for inp, _ in batch)
        self.stats["padded_tokens"] += idx.numel()
        # Every continuation token of the batch at once: its row (= its request) and the
        # position predicting it (p predicts token p + 1: a continuation's logits end at
        # len(inp)).
        rows: list[int] = []
        cols: list[int] = []
        target: list[int] = []
        for k, (inp, targets) in enumerate(batch):
            rows += [k] * len(targets)
            cols += range(len(inp) - len(targets), len(inp))
            target += targets
        logprob, hit = self._token_scores(logits, rows, cols, target)
        where = torch.tensor(rows, device=logprob.device)
        totals = torch.zeros(len(batch), dtype=torch.float64, device=logprob.device)
        totals.index_add_(0, where, logprob.double())
        misses = torch.zeros(len(batch), device=logprob.device)
        misses.index_add_(0, where, (~hit).float())
        for total, missed in zip(totals.tolist(), misses.tolist(), strict=True):
            yield total, missed == 0

    @staticmethod
    def _token_scores(logits: torch.Tensor, rows: list[int], cols: list[int],
                      target: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(target) in float32 and whether each target is the argmax, in chunks."""
        logprobs, hits = [], []
        for a in range(0, len(rows), SCORE_CHUNK):
            r = torch.tensor(rows[a:a + SCORE_CHUNK], device=logits.device)
            c = torch.tensor(cols[a:a + SCORE_CHUNK], device=logits.device)
            t = torch.tensor(target[a:a + SCORE_CHUNK], device=logits.device)
            lp = F.log_softmax(logits[r, c].float(), dim=-1)
            logprobs.append(lp.gather(1, t[:, None])[:, 0])
            hits.append(lp.argmax(dim=-1) == t)
        return torch.cat(logprobs), torch.cat(hits)

    def _forward(self, idx: torch.Tensor) -> torch.Tensor:
        try:
            with torch.inference_mode(), self._autocast():
                out = self.model(idx)
        except Exception as e:
            raise ModelError(f"the model's forward pass raised {type(e).__name__}: {e}") from e
        logits = out[0] if isinstance(out, tuple | list) else out
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 \
                or logits.shape[:2] != idx.shape or logits.shape[2] < VOCAB_SIZE:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise ModelError(f"the model returned logits of shape {shape} for input "
                             f"{tuple(idx.shape)}; expected (batch, time, >= {VOCAB_SIZE})")
        return logits


# --- the spliced template and its checkpoint ----------------------------------------------------

def load_checkpoint(path: Path) -> dict[str, Any]:
    """The template's checkpoint: {"model": state_dict, "model_args": {...}, ...}."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) \
            or not isinstance(ckpt.get("model_args"), dict):
        raise ValueError(f"{path} is not a template checkpoint (model, model_args)")
    return ckpt


def build_model(module: ModuleType, ckpt: dict[str, Any]) -> torch.nn.Module:
    """module.GPT(module.GPTConfig(**model_args)) with the checkpoint's weights, strictly."""
    model: torch.nn.Module = module.GPT(module.GPTConfig(**ckpt["model_args"]))
    # A torch.compile'd model saves its weights under "_orig_mod.".
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)

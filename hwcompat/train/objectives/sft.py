"""Supervised fine-tuning: cross-entropy on the response tokens only, task metrics from greedy generation."""

from __future__ import annotations

from typing import Any

from hwcompat.resolve import ResolvedProfile
from hwcompat.data import metrics
from hwcompat.train import batching
from hwcompat.train.config import TrainConfig
from hwcompat.data.problems import Report
from hwcompat.data.rows import load_datasets
from hwcompat.train.objectives import head_split
from hwcompat.train.objectives.linear_logps import target_logps
from hwcompat.train.model import autocast
from hwcompat import envvars


class ResponseLoss:
    """Summed cross-entropy over response tokens only, never holding more than one chunk of logits.

    A causal-LM forward projects every position onto the vocabulary (hidden x vocab per token, then an fp32 copy
    for the loss): for prompt tokens, whose labels are -100, that work and memory are thrown away, and for the
    response tokens all of it is live at once. Here the decoder runs as usual and the head runs on the response
    positions alone, a chunk at a time (``linear_logps``), the same loss to float precision. Models without the
    usual ``.model`` / ``.lm_head`` split use the plain forward.
    """

    def __init__(self, model, compile_backend: str = "eager"):
        import torch

        self.split = head_split(model)
        self.fast = self.split is not None
        self.model = model
        self.decoder = self.split.decoder if self.fast else None
        if compile_backend == "inductor":
            if self.fast:
                self.decoder = torch.compile(self.decoder)
            else:
                self.model = torch.compile(model)

    def __call__(self, batch: dict, n_items: float):
        """Loss = sum over this batch's response tokens / n_items (the window's token count)."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        labels = batch["labels"]
        if not self.fast:
            return self.model(**inputs, labels=labels, use_cache=False, num_items_in_batch=n_items).loss
        hidden = self.decoder(**inputs, use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != batching.IGNORE
        s = self.split
        return -target_logps(s.head, hidden[:, :-1][keep], targets[keep], s.scale, s.cap).sum() / n_items


def evaluate_loss(model, data: list, micro_batch: int, pad_id: int, device, dtype_name: str) -> float:
    """Mean cross-entropy per response token over ``data``, shortest rows first (least padding)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(data)), key=lambda i: len(data[i].input_ids))
    loss_fn = ResponseLoss(model)
    with torch.no_grad(), autocast(device, dtype_name):
        for s in range(0, len(order), micro_batch):
            b = batching.collate([data[i] for i in order[s:s + micro_batch]], "padded", pad_id)
            tensors = {k: b[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
            total += loss_fn(tensors, 1.0).float().item()
            count += b["n_target"]
    model.train()
    return total / max(1, count)


def greedy_batch(model, chunk: list[list[int]], max_new_tokens: int, pad: int, device) -> list[list[int]]:
    """Greedy continuations of prompts of different lengths in one left-padded batch: the new tokens per row."""
    import torch

    width = max(len(p) for p in chunk)
    ids = torch.full((len(chunk), width), pad, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for i, p in enumerate(chunk):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad, use_cache=True)
    return gen[:, width:].tolist()


def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, device, dtype_name: str,
             batch_size: int = 16) -> list[str]:
    """Greedy decoding, left-padded batches; returns the decoded continuations. A progress bar (gone when done)
    when there is more than one batch: on a CPU, generating 64 eval rows takes minutes."""

    import torch

    from hwcompat.progress import Progress

    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outs: list[str] = []
    starts = range(0, len(prompts), batch_size)
    bar = Progress(len(starts), desc="task metrics (generating)", unit="batch", transient=True,
                   enabled=len(starts) > 1 and envvars.get("LOCAL_RANK", default="0") == "0")
    with bar, torch.no_grad(), autocast(device, dtype_name):
        for s in starts:
            for row in greedy_batch(model, prompts[s:s + batch_size], max_new_tokens, pad, device):
                outs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
            bar.update(1)
    model.train()
    return outs


def task_metrics(model, tokenizer, evals, cfg: TrainConfig, chat: bool, device, dtype_name: str) -> dict[str, float]:
    """Generate for up to ``eval_max_rows`` eval prompts and score against the references."""
    if cfg.eval_metrics == "none" or not evals:
        return {}
    rows = evals[:cfg.eval_max_rows]
    refs = [e.response for e in rows]
    max_new = cfg.eval_max_new_tokens or max(len(tokenizer.encode(r, add_special_tokens=False)) for r in refs) + 16
    prompts = [batching.render_prompt_ids(tokenizer, e.messages, chat) for e in rows]
    preds = generate(model, tokenizer, prompts, max_new, device, dtype_name)
    return metrics.score(preds, refs, cfg.eval_metrics)


class SFT:
    """Prompt/response rows; loss on the response tokens; eval loss plus exact/json/label task metrics."""

    name = "sft"

    @staticmethod
    def check(cfg: TrainConfig) -> tuple[str, float]:
        """Text-level checks before anything heavy; raises on errors.

        Returns the report text and the largest share of any row's characters that are response (trained)
        text: the planner's worst case for how many positions need logits."""
        train, _, report = load_datasets(cfg.train_data, cfg.eval_data, cfg.data_format, cfg.eval_fraction, cfg.seed,
                                         cfg.system_prompt, cfg.max_seq_len, cfg.columns)
        if report.errors:
            raise report.failure()
        share = 0.0
        for ex in train:
            total = sum(len(c) for _, c in ex.messages)
            trained = sum(len(c) for r, c in ex.messages if r == "assistant")
            share = max(share, trained / max(1, total))
        return report.render(), min(1.0, share * 1.25 + 0.02)  # margin: template and tokenisation differences

    def __init__(self, cfg: TrainConfig, profile: ResolvedProfile, device):
        self.cfg, self.profile, self.device = cfg, profile, device
        self.train: list[batching.Tokenized] = []
        self.evals: list[batching.Tokenized] = []
        self.eval_rows: list = []
        self.loss_fn: ResponseLoss | None = None

    def load(self, tokenizer, log) -> None:
        cfg = self.cfg
        train_rows, self.eval_rows, report = load_datasets(cfg.train_data, cfg.eval_data, cfg.data_format,
                                                           cfg.eval_fraction, cfg.seed, cfg.system_prompt,
                                                           cfg.max_seq_len, cfg.columns)
        if report.errors:
            raise report.failure()
        self.tokenizer = tokenizer
        self.chat = batching.uses_chat_template(tokenizer, cfg.chat_template)
        tok = Report()
        self.train = batching.tokenize_all(tokenizer, train_rows, self.chat, cfg.max_seq_len, cfg.overlong, tok, "train")
        self.evals = batching.tokenize_all(tokenizer, self.eval_rows, self.chat, cfg.max_seq_len, cfg.overlong, tok,
                                           "eval")
        report.errors += tok.errors
        if report.errors or not self.train:
            raise report.failure()
        if tok.warnings:  # the launcher already printed the text-level report
            log(tok.render())

    def lengths(self) -> list[int]:
        return [len(t.input_ids) for t in self.train]

    def collate(self, indices: list[int], mode: str, pad_id: int) -> dict[str, Any]:
        return batching.collate([self.train[i] for i in indices], mode, pad_id)

    def bind(self, model, compile_backend: str) -> None:
        self.loss_fn = ResponseLoss(model, compile_backend)

    def loss(self, batch: dict[str, Any], n_items: float):
        inputs = {k: v.to(self.device) for k, v in batch.items()
                  if k in ("input_ids", "labels", "attention_mask", "position_ids")}
        return self.loss_fn(inputs, n_items)

    def evaluate(self, model, with_tasks: bool) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.evals:
            out["eval_loss"] = evaluate_loss(model, self.evals, self.cfg.micro_batch_size,
                                             self.tokenizer.pad_token_id, self.device, self.profile.dtype)
        if with_tasks:
            out.update(task_metrics(model, self.tokenizer, self.eval_rows, self.cfg, self.chat, self.device,
                                    self.profile.dtype))
        return out

"""Direct preference optimisation (Rafailov et al. 2023): the sigmoid loss on (prompt, chosen, rejected) pairs.

    loss = -log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))))   [+ rpo_alpha * NLL(c)]

DPO alone can lower the chosen answer's likelihood along with the rejected one's (both fall, the gap grows)
and so make a good SFT model worse at its task; ``rpo_alpha`` adds the chosen answer's mean per-token negative
log-likelihood to each pair's loss (RPO, Pang et al. 2024; TRL's ``rpo_alpha``), which keeps it up.

log pi(y) is the summed log-probability of the answer's tokens (the SFT masking decides which tokens those
are, so templates behave exactly as in SFT). Chosen and rejected of a pair go through one forward pass as one
row with their shared prompt computed once (``prefix.py``; two padded rows where the attention kernel cannot take
that mask), and logits are computed only at answer positions (as SFT's ResponseLoss does).

The reference model is the trained model as it is before its first step, and its log-probabilities are **cached
per row** (two floats per pair), each computed at the row's first use: the reference never changes, so
recomputing it every batch (TRL's default) would add a forward pass per step for rows already seen, and only
rows a run reaches cost anything (a 20-step demo uses 80 of 340 pairs). No second copy of the base is needed:
without ``init_adapter`` the reference is the base (a fresh LoRA's B is zero), computed with the adapter disabled;
with ``init_adapter`` (SFT -> DPO) it is base + that adapter as loaded, so the adapter's starting weights are kept
(a few MB) and swapped in, by pointer, for the reference forward. A resumed run snapshots the same starting
weights before its checkpoint loads, so it gets the same numbers.
"""

from __future__ import annotations

from typing import Any

from hwcompat.resolve import ResolvedProfile
from hwcompat.train import batching, prefix
from hwcompat.train.config import TrainConfig, effective_beta
from hwcompat.data.problems import Report
from hwcompat.train.model import autocast
from hwcompat.data.pairs import load_pairs
from hwcompat.data.sources import location
from hwcompat.train.objectives import as_reference, head_split, starting_weights
from hwcompat.train.objectives.linear_logps import target_logps
from hwcompat.choices import Finetune


def _response_share(pairs) -> float:
    share = 0.0
    for p in pairs:
        prompt = sum(len(c) for _, c in p.prompt)
        answer = max(len(p.chosen), len(p.rejected))
        share = max(share, answer / max(1, prompt + answer))
    return min(1.0, share * 1.25 + 0.02)


class DPO:
    """Preference pairs; eval reports reward accuracy, margin, chosen/rejected log-probabilities and the loss."""

    name = "dpo"
    # batching=auto: random order (TRL's), not length-grouped. A DPO set is small and its pairs' lengths follow
    # their template, so sorting by length makes each step's pairs alike. bench/dpo.py, 3 seeds, held-out reward
    # accuracy: random 0.861 (TRL 0.861); length-sorted pools of 4 batches 0.844. Speed comes from prefix sharing
    # instead (1.94-2.33x TRL's pairs/s, random order, same accuracy and losses as two padded rows).
    auto_batching = "padded"

    def __init__(self, cfg: TrainConfig, profile: ResolvedProfile, device):
        self.cfg, self.profile, self.device = cfg, profile, device
        self.train: list[tuple[batching.Tokenized, batching.Tokenized]] = []
        self.evals: list[tuple[batching.Tokenized, batching.Tokenized]] = []
        self.eval_pairs: list = []
        self.ref: dict[str, Any] = {}
        self.shared = False  # one row per pair around the shared prompt (decided in bind, from the model)

    @staticmethod
    def check(cfg: TrainConfig) -> tuple[str, float]:
        """The launcher's text-level checks (no tokenizer): the report, and the planner's worst logit share."""
        train, _, report = load_pairs(cfg.train_data, cfg.eval_data, cfg.eval_fraction, cfg.seed, cfg.system_prompt,
                                      cfg.max_seq_len, cfg.columns)
        if report.errors:
            raise report.failure()
        return report.render(), _response_share(train)

    def load(self, tokenizer, log) -> None:
        cfg = self.cfg
        train, self.eval_pairs, report = load_pairs(cfg.train_data, cfg.eval_data, cfg.eval_fraction, cfg.seed,
                                                    cfg.system_prompt, cfg.max_seq_len, cfg.columns)
        if report.errors:
            raise report.failure()
        self.tokenizer = tokenizer
        self.chat = batching.uses_chat_template(tokenizer, cfg.chat_template)
        tok = Report()
        self.train = self._tokenize(train, tok, "train")
        self.evals = self._tokenize(self.eval_pairs, tok, "eval")
        if tok.errors or not self.train:
            raise tok.failure()
        if tok.warnings:
            log(tok.render())

    def _tokenize(self, pairs, report: Report, split: str):
        """Both sides of every pair, truncated to max_seq_len; a side left with no answer tokens is an error."""
        out = []
        limit = self.cfg.max_seq_len
        for p in pairs:
            try:
                sides = [batching.tokenize_example(self.tokenizer, p.example(c), self.chat) for c in (True, False)]
            except ValueError as exc:
                report.error(str(exc))
                continue
            if max(len(s.input_ids) for s in sides) > limit:
                report.warn(f"{split} pairs over max_seq_len={limit}, truncated", location(p.file, p.line))
                sides = [batching.Tokenized(s.input_ids[:limit], s.labels[:limit], s.where) for s in sides]
            empty = [name for name, s in zip(("chosen", "rejected"), sides) if s.n_trainable == 0]
            if empty:
                report.error(f"{location(p.file, p.line)}: {' and '.join(empty)}: no answer tokens left after "
                             f"truncation to max_seq_len={limit} (the prompt fills the window); raise max_seq_len or shorten the "
                             "prompt")
                continue
            out.append((sides[0], sides[1]))
        return out

    def lengths(self) -> list[int]:
        return [len(c.input_ids) + len(r.input_ids) for c, r in self.train]

    def collate(self, indices: list[int], mode: str, pad_id: int, data=None) -> dict[str, Any]:
        """One row per pair around its shared prefix, else chosen rows then rejected; ``n_target`` counts pairs."""
        import torch

        data = self.train if data is None else data
        if self.shared:
            batch = prefix.collate([data[i] for i in indices], pad_id)
        else:
            rows = [data[i][0] for i in indices] + [data[i][1] for i in indices]
            batch = batching.collate(rows, "padded", pad_id)
            batch["chosen_tokens"] = torch.tensor([r.n_trainable for r in rows[:len(indices)]])
        batch["n_target"] = len(indices)
        batch["index"] = torch.tensor(indices, dtype=torch.long)
        return batch

    def bind(self, model, compile_backend: str) -> None:
        """Keep the model's parts and cache the reference log-probabilities (the model before any step)."""
        import torch

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.model = model
        self.split = split = head_split(model)
        self.fast = split is not None
        self.decoder = split.decoder if split else None
        longest = max(len(c.input_ids) + len(r.input_ids) for c, r in self.train + self.evals)
        self.shared = self.fast and prefix.supported(base.config, base.config._attn_implementation, longest)
        self.mask_dtype = base.get_input_embeddings().weight.dtype
        self.additive = base.config._attn_implementation in prefix.ADDITIVE
        if compile_backend == "inductor" and self.fast:
            self.decoder = torch.compile(self.decoder)
        # init_adapter: the reference is base + the adapter as loaded now (before a resume's checkpoint): keep it
        self.start = starting_weights(model, self.cfg.init_adapter) if self.cfg.finetune != Finetune.full else None
        self.ref = {k: torch.full((len(d), 2), float("nan"), dtype=torch.float64)
                    for k, d in (("train", self.train), ("eval", self.evals))}
        if self.cfg.finetune == Finetune.full:
            self._fill_all()

    def _fill_all(self) -> None:
        """A full fine-tune has no adapter to switch off: every row's reference log-probabilities are computed now,
        from the model as loaded (before any step, and before a resume's checkpoint replaces the weights), so no
        frozen copy of the model is kept. One forward pass over the data without gradients, at every (re)start."""
        for key, data in (("train", self.train), ("eval", self.evals)):
            for s in range(0, len(data), self.cfg.micro_batch_size):
                idx = list(range(s, min(len(data), s + self.cfg.micro_batch_size)))
                with autocast(self.device, self.profile.dtype):
                    self._fill(self.collate(idx, "padded", self._pad(), data), self.ref[key])

    def _pad(self) -> int:
        return self.tokenizer.pad_token_id

    def sequence_logps(self, batch: dict[str, Any]):
        """Per row: the sum of log p(token) over the row's answer tokens (labels != -100)."""
        import torch

        if "segments" in batch:
            return self._shared_logps(batch)
        ids, mask, labels = (batch[k].to(self.device) for k in ("input_ids", "attention_mask", "labels"))
        targets = labels[:, 1:]
        keep = targets != batching.IGNORE
        if self.fast:
            hidden = self.decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            s = self.split
            token_logp = target_logps(s.head, hidden[:, :-1][keep], targets[keep], s.scale, s.cap)
        else:
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1][keep].float()
            token_logp = logits.log_softmax(-1).gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)
        rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(targets)[keep]
        return torch.zeros(ids.shape[0], dtype=token_logp.dtype, device=ids.device).index_add(0, rows, token_logp)

    def _shared_logps(self, batch: dict[str, Any]):
        """sequence_logps for prefix-shared rows: chosen sums first, then rejected, as for two padded rows."""
        import torch

        ids, positions, segments, src, target, row = (batch[k].to(self.device) for k in (
            "input_ids", "position_ids", "segments", "src", "target", "row"))
        mask = prefix.attention_mask(segments, self.mask_dtype, self.additive)
        hidden = self.decoder(input_ids=ids, attention_mask=mask, position_ids=positions,
                              use_cache=False).last_hidden_state
        s = self.split
        token_logp = target_logps(s.head, hidden.reshape(-1, hidden.shape[-1])[src], target, s.scale, s.cap)
        return torch.zeros(2 * ids.shape[0], dtype=token_logp.dtype, device=ids.device).index_add(0, row, token_logp)

    def _terms(self, batch: dict[str, Any], ref):
        """(per-pair losses, chosen rewards, rejected rewards, policy logps) for a collated batch."""
        import torch.nn.functional as F

        self._fill(batch, ref)
        logps = self.sequence_logps(batch)
        n = batch["n_target"]
        ref = ref[batch["index"]].to(logps.device, logps.dtype)
        beta = effective_beta(self.cfg)
        chosen = beta * (logps[:n] - ref[:, 0])
        rejected = beta * (logps[n:] - ref[:, 1])
        losses = -F.logsigmoid(chosen - rejected)
        if self.cfg.rpo_alpha:  # + the chosen answer's per-token NLL (RPO), so its likelihood cannot sink
            tokens = batch["chosen_tokens"].to(logps.device)
            losses = losses + self.cfg.rpo_alpha * (-logps[:n] / tokens)
        return losses, chosen, rejected, logps

    def _fill(self, batch: dict[str, Any], table) -> None:
        """Reference log-probabilities for this batch's rows not seen before: the base, adapter disabled, no grad."""
        import torch

        idx = batch["index"]
        if not torch.isnan(table[idx, 0]).any():
            return
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad(), self._as_reference():
            logps = self.sequence_logps(batch).double().cpu()
        self.model.train(was_training)
        n = batch["n_target"]
        table[idx, 0], table[idx, 1] = logps[:n], logps[n:]

    def _as_reference(self):
        """The reference model: the adapter disabled, or (init_adapter) its starting weights swapped in."""
        if self.cfg.finetune == Finetune.full:  # only while _fill_all runs, on the weights as loaded
            import contextlib

            return contextlib.nullcontext()
        return as_reference(self.model, self.start)

    def loss(self, batch: dict[str, Any], n_items: float):
        losses, _, _, _ = self._terms(batch, self.ref["train"])
        return losses.sum() / n_items

    def evaluate(self, model, with_tasks: bool) -> dict[str, float]:
        import torch

        if not self.evals:
            return {}
        sums = {"eval_loss": 0.0, "reward_accuracy": 0.0, "reward_margin": 0.0, "logp_chosen": 0.0,
                "logp_rejected": 0.0}
        model.eval()
        with torch.no_grad(), autocast(self.device, self.profile.dtype):
            for s in range(0, len(self.evals), self.cfg.micro_batch_size):
                idx = list(range(s, min(len(self.evals), s + self.cfg.micro_batch_size)))
                losses, c, r, logps = self._terms(self.collate(idx, "padded", self._pad(), self.evals), self.ref["eval"])
                n = len(idx)
                for key, value in (("eval_loss", losses), ("reward_accuracy", (c > r).float()),
                                   ("reward_margin", c - r), ("logp_chosen", logps[:n]), ("logp_rejected", logps[n:])):
                    sums[key] += float(value.float().sum())
        model.train()
        out = {k: v / len(self.evals) for k, v in sums.items()}
        if with_tasks:
            from hwcompat.train.objectives.sft import task_metrics

            rows = [p.example(True) for p in self.eval_pairs]  # the preferred answer is the reference
            out.update(task_metrics(model, self.tokenizer, rows, self.cfg, self.chat, self.device, self.profile.dtype))
        return out

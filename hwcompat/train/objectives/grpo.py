"""Group relative policy optimisation (Shao et al. 2024, DeepSeekMath) on rewards you can verify: your task metric.

Each prompt's ``num_generations`` (G) completions are sampled from the model being trained (``rollout.py``: one
prefill, the KV cache expanded G ways), scored by the rewards (``rewards.py``: built-in task metrics against the
row's answer, or your function), and each completion's advantage is its reward against its group's::

    A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)        scale_rewards: group (batch: the batch's std; none: 1)

The loss is PPO's clipped surrogate per completion token, with TRL's names and defaults (``loss_type`` dapo)::

    w_t = exp(logp_t - logp_old_t)                 importance_sampling_level: token
    w   = exp(mean_t(logp_t - logp_old_t))         sequence (GSPO, Zheng et al. 2025)
    l_t = -min(w A, clip(w, 1 - epsilon, 1 + epsilon_high) A) + beta * KL_t,
    KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (k3, Schulman 2020; only when beta > 0)

    grpo:    mean over completions of (sum_t l_t / |o_i|)
    dapo:    sum over every token / the tokens of the whole accumulation window (Yu et al. 2025)
    dr_grpo: sum over every token / (completions x max_completion_length) (Liu et al. 2025)

With one optimizer step per generation (``num_iterations: 1``, on-policy) logp_old is logp detached: w = 1 and the
gradient is the policy gradient. With ``num_iterations: mu`` > 1 (TRL's), each window of rollouts is stepped on mu
times: logp_old is the policy's at generation (no gradient, kept with the rollout, and in a checkpoint, so a resume
between those steps reuses them to the bit). The rollout happens in ``collate``, before the accumulation window's first
forward, so DAPO's token count is known before any loss; each prompt's group stays in one micro-batch (one rank).
Log-probabilities run through the chunked head (``linear_logps``): never a ``[rows x completion x vocab]`` tensor.
The reference, where beta > 0, is the base with the adapter disabled (or ``init_adapter``'s starting weights), as
for DPO: no second copy of the model.
"""

from __future__ import annotations

import time
from typing import Any

from hwcompat.data.problems import Report
from hwcompat.data.rows import read_prompts, split_eval
from hwcompat.data.chat import render_prompt_ids, uses_chat_template
from hwcompat.errors import InputError
from hwcompat.resolve import ResolvedProfile
from hwcompat.train import prefix
from hwcompat.train import rewards as rewards_mod
from hwcompat.train import rollout
from hwcompat.train.config import TrainConfig, effective_beta
from hwcompat.train.model import autocast
from hwcompat.train.objectives import as_reference, head_split, starting_weights
from hwcompat.train.objectives.linear_logps import target_logps
from hwcompat.choices import Finetune
from hwcompat.train.objectives.grpo_loss import advantages, reduce, token_losses, torch_kl
from hwcompat.train.objectives.grpo_rows import Prompt, loss_inputs, shared_width


#: Eval prompts whose G sampled completions each eval records (report.html shows them with their rewards).
SAMPLED_PROMPTS = 2


def check_settings(cfg: TrainConfig, where: str = "config") -> list[rewards_mod.Reward]:
    """The rewards, resolved before anything loads (the group and length rules are the config's own:
    ``config.grpo_problem``)."""
    return rewards_mod.resolve(cfg.rewards, cfg.reward_weights, where)


def read(cfg: TrainConfig, report: Report) -> tuple[list, list]:
    """(train, eval) prompt rows: (conversation, reference or None, file:line), each file read once."""
    train = [r for f in cfg.train_data for r in read_prompts(f, report, columns=cfg.columns)]
    evals = [r for f in cfg.eval_data for r in read_prompts(f, report, columns=cfg.columns)]
    if not cfg.eval_data and not report.errors:
        train, evals = split_eval(train, cfg.eval_fraction, cfg.seed)
    if not train and not report.errors:
        report.error("train data: no prompts left after the eval split")
    return train, evals


class GRPO:
    """Prompt rows and rewards; eval reports each reward and the task metrics of greedy answers."""

    name = "grpo"
    auto_batching = "padded"  # random order, as TRL samples prompts

    def __init__(self, cfg: TrainConfig, profile: ResolvedProfile, device):
        self.cfg, self.profile, self.device = cfg, profile, device
        self.rewards = check_settings(cfg)
        self.train: list[Prompt] = []
        self.evals: list[Prompt] = []
        self.micro_batch = cfg.micro_batch_size // cfg.num_generations  # prompts per micro-batch
        self.position, self.rank, self.iteration = 0, 0, 0
        self.stats: list[dict[str, Any]] = []
        self.iterations = cfg.num_iterations  # the recipe repeats each generation's window this many steps
        self.rollouts: dict[int, dict[str, Any]] = {}  # num_iterations > 1: this window's rollouts, by position

    @staticmethod
    def check(cfg: TrainConfig) -> tuple[str, float]:
        check_settings(cfg)
        report = Report()
        train, _ = read(cfg, report)
        if report.errors:
            raise report.failure()
        longest = max((sum(len(c) for _, c in conv) for conv, _, _ in train), default=1)
        share = cfg.max_completion_length * 4 / max(1, longest + cfg.max_completion_length * 4)  # ~4 chars a token
        return report.render(), min(1.0, share * 1.25 + 0.02)

    def load(self, tokenizer, log) -> None:
        report = Report()
        train, evals = read(self.cfg, report)
        if report.errors:
            raise report.failure()
        self.tokenizer = tokenizer
        self.chat = uses_chat_template(tokenizer, self.cfg.chat_template)
        self.train = self._tokenize(train, report, "train")
        self.evals = self._tokenize(evals, report, "eval")
        if report.errors or not self.train:
            raise report.failure() if report.errors else InputError("train data: no prompts")
        if report.warnings:
            log(report.render())

    def _tokenize(self, rows, report: Report, split: str) -> list[Prompt]:
        cfg = self.cfg
        room = cfg.max_seq_len - cfg.max_completion_length
        out = []
        for conv, reference, where in rows:
            msgs = tuple(conv)
            if cfg.system_prompt and not any(r == "system" for r, _ in msgs):
                msgs = (("system", cfg.system_prompt), *msgs)
            ids = render_prompt_ids(self.tokenizer, (*msgs, ("assistant", "")), self.chat)
            if len(ids) > room:
                if cfg.overlong == "drop":
                    report.warn(f"{split} prompts over max_seq_len - max_completion_length = {room} tokens, dropped",
                                where)
                    continue
                report.warn(f"{split} prompts over max_seq_len - max_completion_length = {room} tokens, their "
                            "start cut", where)
                ids = ids[-room:]
            text = next((c for r, c in reversed(msgs) if r == "user"), "")
            out.append(Prompt(ids, text, reference, where, msgs))
        return out

    def lengths(self) -> list[int]:
        return [len(p.ids) + self.cfg.max_completion_length for p in self.train]

    def seek(self, position: int, rank: int, iteration: int = 0) -> None:
        """The micro-batch about to be collated: its place in the data seeds its sampling (rollout.seed_for);
        ``iteration`` > 0 reuses that place's rollout (num_iterations)."""
        self.position, self.rank, self.iteration = position, rank, iteration

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the window's rollouts, so a resume between a generation's steps reuses them."""
        return {"rollouts": self.rollouts} if self.iterations > 1 else {}

    def load_state(self, state: dict[str, Any]) -> None:
        self.rollouts = dict(state.get("rollouts") or {})

    def bind(self, model, compile_backend: str) -> None:
        import torch

        self.model = model
        self.split = head_split(model)
        self.decoder = self.split.decoder if self.split else None
        if compile_backend == "inductor" and self.split is not None:
            self.decoder = torch.compile(self.decoder)
        self.start = starting_weights(model, self.cfg.init_adapter, full=self.cfg.finetune == Finetune.full and
                                      effective_beta(self.cfg) > 0)
        self.eos = rollout.eos_ids(model, self.tokenizer)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.base_config, self.attention = base.config, base.config._attn_implementation
        self.can_share = self.split is not None
        self.mask_dtype = base.get_input_embeddings().weight.dtype
        self.additive = self.attention in prefix.ADDITIVE

    # --- rollout: generate, score, advantages ------------------------------------------------------------------

    def collate(self, indices: list[int], mode: str, pad_id: int, data=None) -> dict[str, Any]:
        """Sample G completions of each prompt, score them, and return the loss's tensors (``n_target``: the
        completions, or for dapo their tokens)."""
        import torch

        if data is None and self.iteration and self.position in self.rollouts:  # num_iterations: the same rollout
            batch = self.rollouts[self.position]
            self.stats.append(dict(batch["note"]))
            return batch
        cfg, prompts = self.cfg, [(self.train if data is None else data)[i] for i in indices]
        t0 = time.perf_counter()
        out = self._sample(prompts, cfg.num_generations, cfg.temperature, cfg.top_p,
                           rollout.seed_for(cfg.seed, self.position, self.rank))
        g = cfg.num_generations
        texts = [self.tokenizer.decode(c, skip_special_tokens=True).strip() for c in out.completions]
        per_reward = rewards_mod.score(self.rewards, [p.text for p in prompts for _ in range(g)], texts,
                                       [p.reference for p in prompts for _ in range(g)],
                                       [p.where for p in prompts for _ in range(g)])
        values = torch.tensor(per_reward, dtype=torch.float32)  # [rewards x completions]
        weights = torch.tensor([r.weight for r in self.rewards], dtype=torch.float32)
        total = (values * weights.unsqueeze(-1)).sum(0)
        batch = self._tensors(prompts, out, pad_id)
        batch["advantages"] = advantages(total, g, cfg.scale_rewards)
        if effective_beta(cfg):
            batch["ref_logps"] = self._reference_logps(batch)
        self._note(values, total, out, batch, time.perf_counter() - t0)
        if self.iterations > 1 and data is None:
            self._keep(batch)
        return batch

    def _keep(self, batch: dict[str, Any]) -> None:
        """num_iterations > 1: the policy's log-probabilities now (the ratio's denominator for every reuse, TRL's
        old_per_token_logps) and the rollout itself, kept for this window's later steps (older windows dropped)."""
        ga = self.cfg.gradient_accumulation
        import contextlib

        batch["old_logps"] = self._no_grad_logps(batch, contextlib.nullcontext())
        batch["note"] = {k: v for k, v in self.stats[-1].items()}
        self.rollouts = {p: b for p, b in self.rollouts.items() if p // ga == self.position // ga}
        self.rollouts[self.position] = batch

    def _no_grad_logps(self, batch: dict[str, Any], weights):
        """token_logps without gradients, in eval mode, with ``weights`` swapped in (the reference) or not."""
        import torch

        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), autocast(self.device, self.profile.dtype), weights:
                return self.token_logps(batch).cpu()
        finally:
            self.model.train(was)

    def _sample(self, prompts: list[Prompt], g: int, temperature: float, top_p: float, seed: int):
        import torch

        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), autocast(self.device, self.profile.dtype), self._rollout_weights():
                return rollout.generate(self.model, [p.ids for p in prompts], g, self.cfg.max_completion_length,
                                        temperature, top_p, self.eos, self.tokenizer.pad_token_id, seed)
        finally:
            self.model.train(was)

    def _rollout_weights(self):
        """On the CPU, rollouts run through base + adapter merged (``rollout.merged``: a quarter of a CPU
        rollout's time is the adapters' extra products); on a card the copy would cost the base's size again."""
        import contextlib

        if self.device.type != "cpu" or getattr(self.model, "hwcompat_streamer", None) is not None:
            return contextlib.nullcontext()
        return rollout.merged(self.model)

    def _tensors(self, prompts: list[Prompt], out: rollout.Rollout, pad_id: int) -> dict[str, Any]:
        """The loss's inputs (grpo_rows): one row per prompt where the model takes a 4-D mask (prefix.supported)
        and that computes fewer tokens, else one row per completion."""
        g = self.cfg.num_generations
        width = shared_width(prompts, out.completions, g) if self.can_share else None
        share = width is not None and prefix.supported(self.base_config, self.attention, width)
        return loss_inputs(prompts, out.completions, out.ended, g, pad_id, self.cfg, share)

    def _note(self, values, total, out: rollout.Rollout, batch: dict[str, Any], seconds: float) -> None:
        lengths = [len(c) for c in out.completions]
        g = self.cfg.num_generations
        self.stats.append({"values": values, "total": total, "lengths": lengths, "ended": list(out.ended),
                           "group_std": total.view(-1, g).std(dim=1).mean().item(), "rollout_s": seconds})

    # --- the loss ------------------------------------------------------------------------------------------------

    def token_logps(self, batch: dict[str, Any]):
        """log p(completion token) per position, ``[rows x completion]`` (0 where masked); the chunked head."""
        import torch

        if "segments" in batch:
            return self._shared_logps(batch)
        ids, attn, pos = (batch[k].to(self.device) for k in ("input_ids", "attention_mask", "position_ids"))
        mask = batch["loss_mask"].to(self.device)
        width = batch["prompt_width"]
        targets = ids[:, width:]
        keep = mask > 0
        if self.split is not None:
            hidden = self.decoder(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False)
            h = hidden.last_hidden_state[:, width - 1:-1]
            s = self.split
            flat = target_logps(s.head, h[keep], targets[keep], s.scale, s.cap)
        else:  # no .model / .lm_head split: the model's own logits, only at completion positions
            logits = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False,
                                logits_to_keep=targets.shape[1] + 1).logits[:, :-1]
            flat = logits[keep].float().log_softmax(-1).gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)
        out = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device)
        out[keep] = flat
        return out

    def _shared_logps(self, batch: dict[str, Any]):
        import torch

        ids, pos, segments, src, target, dest = (batch[k].to(self.device) for k in (
            "input_ids", "position_ids", "segments", "src", "target", "dest"))
        mask = prefix.attention_mask(segments, self.mask_dtype, self.additive)
        hidden = self.decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
        s = self.split
        flat = target_logps(s.head, hidden.reshape(-1, hidden.shape[-1])[src], target, s.scale, s.cap)
        shape = batch["loss_mask"].shape
        return torch.zeros(shape[0] * shape[1], dtype=flat.dtype, device=flat.device).index_put(
            (dest,), flat).view(shape)

    def _reference_logps(self, batch: dict[str, Any]):
        return self._no_grad_logps(batch, as_reference(self.model, self.start))

    def loss(self, batch: dict[str, Any], n_items: float):
        import torch

        logp = self.token_logps(batch)
        mask = batch["loss_mask"].to(logp.device)
        adv = batch["advantages"].to(logp.device)
        ref = batch["ref_logps"].to(logp.device) if "ref_logps" in batch else None
        old = batch["old_logps"].to(logp.device) if "old_logps" in batch else logp.detach()  # on-policy: w = 1
        losses, w = token_losses(logp, old, ref, adv, mask, self.cfg)
        with torch.no_grad():
            self._note_loss(logp, ref, adv, mask, w)
        return reduce(losses, mask, self.cfg) / n_items

    def _note_loss(self, logp, ref, adv, mask, w) -> None:
        cfg = self.cfg
        high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
        a = adv.unsqueeze(-1)
        clipped = (((w < 1 - cfg.epsilon) & (a < 0)) | ((w > 1 + high) & (a > 0))).float().expand_as(mask)
        n = mask.sum().clamp(min=1.0)
        note = {"clip_ratio": float((clipped * mask).sum() / n)}
        if ref is not None:
            kl = torch_kl(ref, logp)
            note["kl"] = float((kl * mask).sum() / n)
        if self.stats:
            self.stats[-1].update(note)

    def step_metrics(self) -> dict[str, float]:
        """This step's rollout and loss figures, for metrics.jsonl and the trackers (this process's micro-batches)."""
        import torch

        stats, self.stats = self.stats, []
        if not stats:
            return {}
        values = torch.cat([s["values"] for s in stats], dim=1)
        total = torch.cat([s["total"] for s in stats])
        lengths = [n for s in stats for n in s["lengths"]]
        ended = [e for s in stats for e in s["ended"]]
        out = {"reward": total.mean().item(), "reward_std": sum(s["group_std"] for s in stats) / len(stats),
               "completions": float(len(lengths)), "completion_length": sum(lengths) / len(lengths),
               "completion_length_max": float(max(lengths)), "truncated_share": 1 - sum(ended) / len(ended),
               "rollout_seconds": sum(s["rollout_s"] for s in stats)}
        for r, row in zip(self.rewards, values):
            key = rewards_mod.short(r.name)
            out[f"rewards/{key}/mean"], out[f"rewards/{key}/std"] = row.mean().item(), row.std().item()
        for key in ("clip_ratio", "kl"):
            seen = [s[key] for s in stats if key in s]
            if seen:
                out[key] = sum(seen) / len(seen)
        return out

    # --- eval ------------------------------------------------------------------------------------------------

    def evaluate(self, model, with_tasks: bool) -> dict[str, float]:
        """Greedy answers to the eval prompts, scored by every reward and (where rows have answers) the task
        metrics; GRPO has no eval loss."""
        from hwcompat.data import metrics
        from hwcompat.train.objectives.sft import generate

        rows = self.evals[:self.cfg.eval_max_rows]
        if not rows or not with_tasks:
            return {}
        preds = generate(model, self.tokenizer, [p.ids for p in rows], self.cfg.max_completion_length, self.device,
                         self.profile.dtype)
        per_reward = rewards_mod.score(self.rewards, [p.text for p in rows], preds, [p.reference for p in rows],
                                       [p.where for p in rows])
        out: dict[str, float] = {}
        total = [0.0] * len(rows)
        for r, values in zip(self.rewards, per_reward):
            out[f"reward_{rewards_mod.short(r.name)}"] = sum(values) / len(values)
            total = [t + r.weight * v for t, v in zip(total, values)]
        out["reward"] = sum(total) / len(total)
        answered = [(p, a) for p, a in zip(preds, rows) if a.reference is not None]
        if answered and self.cfg.eval_metrics != "none":
            out.update(metrics.score([p for p, _ in answered], [a.reference for _, a in answered],
                                     self.cfg.eval_metrics))
        out["samples"] = self._samples(rows[:SAMPLED_PROMPTS])
        return out

    def _samples(self, rows: list[Prompt]) -> list[dict[str, Any]]:
        """A few eval prompts' G sampled completions and total rewards, as the run samples them (report.html)."""
        g = self.cfg.num_generations
        got = self._sample(rows, g, self.cfg.temperature, self.cfg.top_p, rollout.seed_for(self.cfg.seed, -1))
        texts = [self.tokenizer.decode(c, skip_special_tokens=True).strip() for c in got.completions]
        per = rewards_mod.score(self.rewards, [p.text for p in rows for _ in range(g)], texts,
                                [p.reference for p in rows for _ in range(g)],
                                [p.where for p in rows for _ in range(g)])
        totals = [sum(r.weight * v[j] for r, v in zip(self.rewards, per)) for j in range(len(texts))]
        return [{"prompt": p.text, "reference": p.reference, "completions": texts[i * g:(i + 1) * g],
                 "rewards": totals[i * g:(i + 1) * g]} for i, p in enumerate(rows)]



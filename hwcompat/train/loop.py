"""The training recipe, top to bottom. Runs inside the launched worker process.

    hwcompat train config.yaml                 # launcher: profile env set, then this
    hwcompat train config.yaml --resume        # continue from the last checkpoint
    hwcompat train config.yaml --devices all   # torchrun, one process per identical device

Steps: read run.json -> data checks -> tokenise + mask -> load model in the
profile's dtype / attention -> LoRA -> loop (accumulate, clip, step) with
eval, checkpoints and signal handling -> adapter + summary in the run dir.
The hardware policy (dtype, attention, compile, env) arrives resolved; this
module never re-decides it.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwcompat.errors import DataError, HwcompatError, InputError
from hwcompat.fsutil import atomic_dir, atomic_write_json, atomic_write_text
from hwcompat.train import batching, checkpoint, metrics
from hwcompat.train.config import TrainConfig, config_from_dict
from hwcompat.train.data import Report, load_datasets

EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def log(dist: Dist, msg: str) -> None:
    if dist.main:
        print(msg, file=sys.stderr, flush=True)


def _init_dist() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as td

    import torch

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    td.init_process_group(backend)
    return Dist(td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _device(profile: dict[str, Any], dist: Dist, cpu_emulation: bool = False):
    import torch

    if profile["name"] == "cpu" or cpu_emulation:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise HwcompatError(f"the {profile['name']} profile needs a GPU, but this torch ({torch.__version__}) sees "
                            "none; run `hwcompat doctor` for the install command, or use the "
                            f"{profile['image']} image")
    torch.cuda.set_device(dist.local_rank)
    return torch.device("cuda", dist.local_rank)


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_model(cfg: TrainConfig, profile: dict[str, Any], device):
    """Base model in the profile's dtype and attention kernel, LoRA on top (adapters in fp32)."""
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    # peft calls a transformers property deprecated in v5; the warning is theirs, not the user's.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    dtype = getattr(torch, profile["dtype"])
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": profile["attention"],
                              "trust_remote_code": cfg.trust_remote_code,
                              "use_safetensors": True}  # never unpickle weights (the launcher refused .bin-only)
    if cfg.qlora:
        if "nf4" not in profile["quantization"]:
            raise InputError(f"qlora=true: the {profile['name']} profile has no NF4 support "
                             f"({profile['reasons'].get('quantization.nf4', '')}); use plain LoRA (qlora=false)")
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise InputError("qlora=true needs bitsandbytes: pip install bitsandbytes") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.float16)
        kwargs["device_map"] = {"": device.index or 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.model, **kwargs)
    except OSError as exc:
        raise InputError(f"model {cfg.model}: cannot load it ({str(exc).splitlines()[0]}); "
                         "point model= at a local folder with config.json and weights") from None
    if not cfg.qlora:
        model.to(device)
    model.config.use_cache = False
    if cfg.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    targets = "all-linear" if cfg.lora_target_modules == ["all-linear"] else cfg.lora_target_modules
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM", bias="none")
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        raise InputError(f"lora_target_modules={cfg.lora_target_modules}: {exc}") from None
    # Adapters train in fp32 whatever the base dtype (peft's autocast_adapter_dtype does this for
    # fp16/bf16); make sure, so fp16 loss scaling never sees fp16 master weights.
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def _lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


class SecondInterrupt(KeyboardInterrupt):
    """A second Ctrl-C while the first one's checkpoint is pending: stop at once."""


class Signals:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next micro-batch boundary and exits.

    Acting at a micro-batch, not an optimizer step, bounds the time to exit by one forward/backward pass,
    so ``docker stop`` (SIGKILL after 10 s) never lands before the checkpoint even with long accumulation.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._old = {}
        for sig in EXIT_SIGNAL:
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise SecondInterrupt  # second Ctrl-C: stop now
        self.received = signum

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _autocast(device, dtype_name: str):
    import contextlib

    import torch

    if dtype_name == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype_name))


class ResponseLoss:
    """Summed cross-entropy over response tokens only, computing logits only where they are needed.

    A causal-LM forward projects every position onto the vocabulary (hidden x vocab per token, then
    an fp32 copy for the loss): for prompt tokens, whose labels are -100, that work and memory are
    thrown away. Here the decoder runs as usual and the LM head runs on the response positions
    alone, the same loss to float precision. Models without the usual ``.model`` / ``.lm_head``
    split, or with logit soft-capping, use the plain forward.
    """

    def __init__(self, model, compile_backend: str = "eager"):
        import torch

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        cfg = getattr(base, "config", None)
        self.fast = (hasattr(base, "model") and hasattr(base, "lm_head")
                     and not getattr(cfg, "final_logit_softcapping", None)
                     and not getattr(cfg, "logit_scale", None))
        self.model = model
        self.decoder = base.model if self.fast else None
        self.head = base.lm_head if self.fast else None
        if compile_backend == "inductor":
            if self.fast:
                self.decoder = torch.compile(self.decoder)
            else:
                self.model = torch.compile(model)

    def __call__(self, batch: dict, n_items: float):
        """Loss = sum over this batch's response tokens / n_items (the window's token count)."""
        import torch.nn.functional as F

        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        labels = batch["labels"]
        if not self.fast:
            return self.model(**inputs, labels=labels, use_cache=False, num_items_in_batch=n_items).loss
        hidden = self.decoder(**inputs, use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != batching.IGNORE
        logits = self.head(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum") / n_items


def evaluate_loss(model, data: list, micro_batch: int, pad_id: int, device, dtype_name: str) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(data)), key=lambda i: len(data[i].input_ids))
    loss_fn = ResponseLoss(model)
    with torch.no_grad(), _autocast(device, dtype_name):
        for s in range(0, len(order), micro_batch):
            b = batching.collate([data[i] for i in order[s:s + micro_batch]], "padded", pad_id)
            tensors = {k: b[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
            total += loss_fn(tensors, 1.0).float().item()
            count += b["n_target"]
    model.train()
    return total / max(1, count)


def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, device, dtype_name: str,
             batch_size: int = 16) -> list[str]:
    """Greedy decoding, left-padded batches; returns the decoded continuations."""
    import torch

    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outs: list[str] = []
    with torch.no_grad(), _autocast(device, dtype_name):
        for s in range(0, len(prompts), batch_size):
            chunk = prompts[s:s + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                 use_cache=True)
            for row in gen[:, width:]:
                outs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    model.train()
    return outs


def task_metrics(model, tokenizer, evals, cfg: TrainConfig, chat: bool, device, dtype_name: str) -> dict[str, float]:
    if cfg.eval_metrics == "none" or not evals:
        return {}
    rows = evals[:cfg.eval_max_rows]
    refs = [e.response for e in rows]
    max_new = cfg.eval_max_new_tokens or max(len(tokenizer.encode(r, add_special_tokens=False)) for r in refs) + 16
    prompts = [batching.render_prompt_ids(tokenizer, e.messages, chat) for e in rows]
    preds = generate(model, tokenizer, prompts, max_new, device, dtype_name)
    return metrics.score(preds, refs, cfg.eval_metrics)


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def _oom_advice(cfg: TrainConfig, profile: dict[str, Any], step: int) -> str:
    tips = []
    if cfg.micro_batch_size > 1:
        tips.append(f"micro_batch_size={max(1, cfg.micro_batch_size // 2)} "
                    f"gradient_accumulation={cfg.gradient_accumulation * 2} (same effective batch)")
    tips.append(f"max_seq_len={max(128, cfg.max_seq_len // 2)}")
    if not cfg.gradient_checkpointing:
        tips.append("gradient_checkpointing=true (about a third more time, far less activation memory)")
    if not cfg.qlora and "nf4" in profile["quantization"]:
        tips.append("qlora=true (4-bit base weights)")
    return (f"out of memory at step {step} (micro_batch_size={cfg.micro_batch_size}, "
            f"max_seq_len={cfg.max_seq_len}). Try one of: " + "; ".join(tips) +
            ". `hwcompat plan` estimates what fits before you start.")


def _stop_agreed(signals: Signals, dist, device) -> bool:
    """Has any rank been signalled? With several processes all must agree, or one would wait forever."""
    stop = signals.received is not None
    if dist.world > 1:
        import torch

        flag = torch.tensor([1 if stop else 0], device=device)
        torch.distributed.all_reduce(flag)
        stop = bool(flag.item())
    return stop


def _checkpoint_and_exit(run_dir: Path, step: int, total_steps: int, model, optimizer, scheduler, scaler,
                         history: dict[str, Any], cfg: TrainConfig, dist, signals: Signals, rng: dict[str, Any],
                         mid_step: int) -> int:
    """A signal inside a step: save the last completed step (the partial one is redone on resume)."""
    import torch

    if dist.main:
        path = checkpoint.save(run_dir, step, model, optimizer, scheduler, scaler,
                               {"history": history, "total_steps": total_steps}, cfg.keep_checkpoints, rng=rng)
        log(dist, f"\ninterrupted at step {step}/{total_steps} (micro-batch {mid_step} of "
                  f"{cfg.gradient_accumulation}; that step is redone on resume): checkpoint saved to {path}\n"
                  f"resume with: hwcompat train {run_dir / 'config.yaml'} --resume")
    if dist.world > 1:
        torch.distributed.barrier()
    signals.restore()
    return EXIT_SIGNAL.get(signals.received or signal.SIGTERM, 143)


#: Consecutive optimizer steps with a non-finite loss or gradient norm after which a run is stopped.
NONFINITE_STEPS = 3


def _divergence_advice(cfg: TrainConfig, profile: dict[str, Any], step: int, loss: float, grad_norm: float) -> str:
    """A run whose loss went NaN/inf stops before it can write a NaN adapter; say what to change."""
    fp16 = profile["dtype"] == "float16"
    return (f"training diverged: loss {loss} and gradient norm {grad_norm} were not finite for {NONFINITE_STEPS} "
            f"steps in a row (at step {step}); no adapter was written. Try a lower learning_rate (now "
            f"{cfg.learning_rate:g}, e.g. learning_rate={cfg.learning_rate / 10:g}), max_grad_norm=1.0"
            + (", or dtype=float32 (fp16 overflows on some models)" if fp16 else "")
            + "; earlier checkpoints, if any, are untouched")


def _read_spec(path: Path) -> dict[str, Any]:
    """run.json as the launcher wrote it; damaged or hand-edited into another shape is a clear error."""
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the run's record ({str(exc)[:120]}); start the run again with "
                         "hwcompat train CONFIG (add --overwrite to replace this folder)") from None
    missing = [k for k in ("config", "profile") if not isinstance(spec, dict) or not isinstance(spec.get(k), dict)]
    if missing:
        raise InputError(f"{path}: {', '.join(missing)} missing or not a mapping; start the run again with "
                         "hwcompat train CONFIG (add --overwrite to replace this folder)")
    return spec


def run(run_dir: Path, resume: bool = False) -> int:
    """Train as described by ``run_dir/run.json``; returns the process exit code."""
    t_start = time.time()
    spec = _read_spec(run_dir / "run.json")
    cfg = config_from_dict(spec["config"], f"{run_dir / 'run.json'}: config")
    profile = spec["profile"]
    dist = _init_dist()
    missing_env = {k: v for k, v in profile["env"].items() if os.environ.get(k) != v}
    if missing_env:
        log(dist, f"warning: profile environment not applied in this process: {missing_env}; "
                  "start training through `hwcompat train`")

    import torch
    from transformers import AutoTokenizer

    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    cpu_emulation = bool(spec.get("cpu_emulation"))
    device = _device(profile, dist, cpu_emulation)
    if cpu_emulation:
        log(dist, f"cpu emulation: running the {profile['name']} profile on the CPU (plumbing, not the card)")

    # --- data: checks and tokenisation, all before the model is loaded -------------------------
    train_rows, eval_rows, report = load_datasets(cfg.train_data, cfg.eval_data, cfg.data_format,
                                                  cfg.eval_fraction, cfg.seed, cfg.system_prompt, cfg.max_seq_len)
    if report.errors:
        raise DataError("data checks failed; nothing was trained\n" + report.render())
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code)
    except OSError as exc:
        raise InputError(f"tokenizer {cfg.tokenizer or cfg.model}: cannot load it ({str(exc).splitlines()[0]})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    chat = batching.uses_chat_template(tokenizer, cfg.chat_template)
    tok_report = Report()
    train_tok = batching.tokenize_all(tokenizer, train_rows, chat, cfg.max_seq_len, cfg.overlong, tok_report, "train")
    eval_tok = batching.tokenize_all(tokenizer, eval_rows, chat, cfg.max_seq_len, cfg.overlong, tok_report, "eval")
    report.errors += tok_report.errors
    for k, v in tok_report.warnings.items():
        report.warnings.setdefault(k, []).extend(v)
    if report.errors or not train_tok:
        raise DataError("data checks failed; nothing was trained\n" + report.render())
    if tok_report.warnings:  # the launcher already printed the text-level report
        log(dist, tok_report.render())

    # --- model ----------------------------------------------------------------------------------
    model = load_model(cfg, profile, device)
    loss_fn = ResponseLoss(model, profile["compile_backend"])
    mode = batching.resolve_batching(cfg.batching, profile["attention"])
    pad_id = tokenizer.pad_token_id
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    log(dist, f"model: {cfg.model} | {profile['dtype']} | attention {profile['attention']} | "
              f"compile {profile['compile_backend']} | batching {mode} | "
              f"LoRA r={cfg.lora_r} trains {n_trainable:,} of {n_total:,} parameters")

    # --- schedule ---------------------------------------------------------------------------------
    lengths = [len(t.input_ids) for t in train_tok]
    per_rank = len(batching.plan_batches(lengths, cfg.micro_batch_size, mode, cfg.seed)) // dist.world
    if per_rank == 0:
        raise InputError(f"{len(train_tok)} training rows are too few for micro_batch_size={cfg.micro_batch_size} "
                         f"on {dist.world} process(es)")
    steps_per_epoch = max(1, per_rank // cfg.gradient_accumulation)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = int(cfg.warmup_ratio * total_steps)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.lr_schedule, warmup, total_steps))
    scaler = torch.amp.GradScaler(device.type) if profile["dtype"] == "float16" else None

    def micro_batches(start_micro: int):
        """The deterministic stream of this rank's micro-batches, from a given position (one plan per epoch)."""
        m, planned, mine = start_micro, None, []
        while True:
            epoch, pos = divmod(m, per_rank)
            if epoch != planned:
                plan = batching.plan_batches(lengths, cfg.micro_batch_size, mode, cfg.seed + epoch)
                mine, planned = plan[dist.rank::dist.world][:per_rank], epoch
            yield epoch, batching.collate([train_tok[i] for i in mine[pos]], mode, pad_id)
            m += 1

    metrics_path = run_dir / "metrics.jsonl"
    start_step = 0
    history: dict[str, Any] = {"eval": []}
    if resume:
        ck = checkpoint.latest(run_dir)
        if ck is None:
            raise InputError(f"--resume: no checkpoint in {checkpoint.checkpoint_dir(run_dir)}; start without --resume")
        state = checkpoint.load(ck, model, optimizer, scheduler, scaler)
        start_step = state["step"]
        if start_step > total_steps:
            raise InputError(f"--resume: the run already made {start_step} steps, but these settings give "
                             f"{total_steps} in all; a resume never moves a run backwards (raise epochs or "
                             "max_steps, or start a new run)")
        history = state.get("history", history)
        if dist.main and metrics_path.exists():
            kept = [ln for ln in metrics_path.read_text().splitlines() if json.loads(ln).get("step", 0) <= start_step]
            atomic_write_text(metrics_path, "".join(ln + "\n" for ln in kept))
        log(dist, f"resumed from {ck} at step {start_step}/{total_steps}")
    elif dist.main:
        metrics_path.unlink(missing_ok=True)

    def do_eval(step: int, with_tasks: bool) -> dict[str, Any]:
        rec: dict[str, Any] = {"step": step, "kind": "eval"}
        if eval_tok:
            rec["eval_loss"] = evaluate_loss(model, eval_tok, cfg.micro_batch_size, pad_id, device, profile["dtype"])
        if with_tasks:
            rec.update(task_metrics(model, tokenizer, eval_rows, cfg, chat, device, profile["dtype"]))
        _append_jsonl(metrics_path, rec)
        history["eval"].append(rec)
        shown = metrics.headline(rec)
        log(dist, f"eval @ step {step}: loss {rec.get('eval_loss', float('nan')):.4f} {shown}")
        return rec

    if dist.main and start_step == 0 and cfg.eval_at_start:
        do_eval(0, with_tasks=True)
    if dist.world > 1:
        torch.distributed.barrier()

    # --- the loop -------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    signals = Signals()
    stream = micro_batches(start_step * cfg.gradient_accumulation)
    bar = tqdm(total=total_steps, initial=start_step, disable=not dist.main, unit="step", mininterval=1.0,
               dynamic_ncols=True, file=sys.stderr)
    tokens_done, t_loop = 0, time.time()
    exit_code, step, last_loss, diverged = 0, start_step, float("nan"), 0
    model.train()
    try:
        while step < total_steps:
            rng_at_step = checkpoint.rng_state()  # a stop inside this step resumes from here, bit for bit
            window = []
            for _ in range(cfg.gradient_accumulation):  # one process: a signal also ends the collation
                if dist.world == 1 and signals.received is not None:
                    bar.close()
                    return _checkpoint_and_exit(run_dir, step, total_steps, model, optimizer, scheduler, scaler,
                                                history, cfg, dist, signals, rng_at_step, mid_step=len(window))
                window.append(next(stream))
            n_target = sum(b["n_target"] for _, b in window)
            if dist.world > 1:  # normalise by the global token count so every rank's loss is comparable
                t = torch.tensor([n_target], dtype=torch.long, device=device)
                torch.distributed.all_reduce(t)
                n_target = int(t.item())
            loss_sum = 0.0
            for i, (epoch, b) in enumerate(window):
                if i and _stop_agreed(signals, dist, device):  # mid-accumulation: drop the partial step
                    optimizer.zero_grad(set_to_none=True)
                    bar.close()
                    return _checkpoint_and_exit(run_dir, step, total_steps, model, optimizer, scheduler, scaler,
                                                history, cfg, dist, signals, rng_at_step, mid_step=i)
                inputs = {k: v.to(device) for k, v in b.items() if k in ("input_ids", "labels", "attention_mask",
                                                                          "position_ids")}
                with _autocast(device, profile["dtype"]):
                    loss = loss_fn(inputs, max(1, n_target) / dist.world)
                (scaler.scale(loss) if scaler else loss).backward()
                loss_sum += loss.detach().float().item()
                tokens_done += b["n_tokens"]
            if dist.world > 1:
                for p in trainable:
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
                        p.grad /= dist.world
                ls = torch.tensor([loss_sum], device=device)
                torch.distributed.all_reduce(ls)
                loss_sum = ls.item()
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm).item()
            if scaler:
                scale = scaler.get_scale()
                scaler.step(optimizer)
                scaler.update()
                overflow = scaler.get_scale() < scale  # fp16 overflow: the scaler skipped this step, by design
            else:
                optimizer.step()
                overflow = False
            diverged = 0 if overflow or (math.isfinite(loss_sum) and math.isfinite(grad_norm)) else diverged + 1
            if diverged >= NONFINITE_STEPS:
                raise HwcompatError(_divergence_advice(cfg, profile, step + 1, loss_sum, grad_norm))
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last_loss = loss_sum
            elapsed = time.time() - t_loop
            tps = tokens_done * dist.world / max(elapsed, 1e-9)
            if dist.main:
                _append_jsonl(metrics_path, {"step": step, "kind": "train", "loss": loss_sum,
                                             "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                                             "epoch": epoch, "tokens_per_s": tps})
            bar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
            bar.update(1)
            stop = _stop_agreed(signals, dist, device)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps and dist.main:
                do_eval(step, with_tasks=True)
            if stop or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps):
                if dist.main:
                    path = checkpoint.save(run_dir, step, model, optimizer, scheduler, scaler,
                                           {"history": history, "total_steps": total_steps}, cfg.keep_checkpoints)
                    if stop:
                        bar.close()
                        log(dist, f"\ninterrupted at step {step}/{total_steps}: checkpoint saved to {path}\n"
                                  f"resume with: hwcompat train {run_dir / 'config.yaml'} --resume")
                if dist.world > 1:
                    torch.distributed.barrier()
                if stop:
                    exit_code = EXIT_SIGNAL.get(signals.received or signal.SIGTERM, 143)
                    return exit_code
    except torch.OutOfMemoryError:
        raise HwcompatError(_oom_advice(cfg, profile, step)) from None
    finally:
        signals.restore()
        bar.close()

    train_time = time.time() - t_loop
    # --- final eval and outputs -----------------------------------------------------------------------
    if dist.main:
        final = do_eval(step, with_tasks=True)
        with atomic_dir(run_dir / "adapter") as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
        first = history["eval"][0] if history["eval"] and history["eval"][0]["step"] == 0 else {}
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_peak_bytes()
        import peft
        import transformers

        from hwcompat import __version__

        summary = {
            "steps": step, "total_steps": total_steps, "train_rows": len(train_tok), "eval_rows": len(eval_tok),
            "final_train_loss": last_loss, "eval_before": first, "eval_after": final,
            "tokens_per_s": tokens_done * dist.world / max(train_time, 1e-9), "train_seconds": train_time,
            "wall_seconds": time.time() - t_start, "peak_memory_bytes": peak,
            "peak_memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process max RSS",
            "world_size": dist.world, "batching": mode, "profile_env_applied": not missing_env,
            "cpu_emulation": cpu_emulation, "profile": profile["name"],
            "env_seen": {k: os.environ.get(k) for k in profile["env"]},
            "dtype": profile["dtype"], "attention": profile["attention"],
            "compile_backend": profile["compile_backend"],
            "versions": {"hwcompat": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__, "python": sys.version.split()[0]},
        }
        atomic_write_json(run_dir / "summary.json", summary)
        log(dist, _summary_text(summary, run_dir))
        if cfg.export == "gguf":
            export_run(run_dir, cfg, lambda m: log(dist, m))
    if dist.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return exit_code


def export_run(run_dir: Path, cfg: TrainConfig, say) -> None:
    """train -> merge -> export in one command: merged/ (safetensors), model.gguf and a Modelfile."""
    import shutil

    from hwcompat.export.gguf import export_gguf
    from hwcompat.export.ollama import write_modelfile
    from hwcompat.merge import merge

    merged = run_dir / "merged"
    shutil.rmtree(merged, ignore_errors=True)
    merge(run_dir / "adapter", cfg.model, merged, log=lambda m: None)
    say(f"merged: {merged}")
    res = export_gguf(merged, run_dir / "model.gguf", cfg.export_type, overwrite=True)  # the run's own outputs
    path, cmd = write_modelfile(res.path, merged, overwrite=True)
    say(f"gguf: {res.path} ({res.qtype}); Modelfile: {path}\nrun: {cmd}")


def _summary_text(s: dict[str, Any], run_dir: Path) -> str:
    before, after = s["eval_before"], s["eval_after"]
    lines = [f"done: {s['steps']} steps in {s['train_seconds']:.1f}s, {s['tokens_per_s']:,.0f} tokens/s, "
             f"peak memory {s['peak_memory_bytes'] / 2**30:.2f} GiB"]
    keys = [k for k in ("eval_loss", "exact_match", "accuracy", "json_valid", "field_precision", "field_recall",
                        "field_f1") if k in after]
    if keys:
        lines.append(f"{'metric':16} {'before':>8} {'after':>8}")
        for k in keys:
            b = before.get(k)
            shown = "-" if b is None else f"{b:.3f}"
            lines.append(f"{k:16} {shown:>8} {after[k]:8.3f}")
    lines.append(f"adapter: {run_dir / 'adapter'}")
    return "\n".join(lines)

"""The one export chain: merged weights -> GGUF -> verification in llama.cpp -> Ollama Modelfile.

``hwcompat export`` runs it on a merged folder; ``hwcompat train --export gguf`` runs the merge first and then
the same steps, so the two commands check, write, verify and report alike. Everything the Modelfile needs is
checked before the GGUF is written; a GGUF that fails verification gets no Modelfile, so Ollama is never
pointed at it.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hwcompat.errors import InputError
from hwcompat.choices import Finetune, Method

Say = Callable[[str], None]


@dataclass(frozen=True)
class ExportOptions:
    """What to write and check: the typed form of ``hwcompat export``'s flags (and of a run's export keys)."""

    gguf: Path
    qtype: str = "f16"
    ollama: bool = False
    temperature: float = 0.0
    system: str | None = None
    tag: str | None = None
    overwrite: bool = False
    verify: bool | None = None  # None: verify when llama.cpp (hwcompat[gguf]) is installed
    data: str | None = None  # SFT rows to verify on (default: the bundled general prompts)
    verify_rows: int = 8
    force: bool = False  # export a model merged from a run its regression guard flagged
    imatrix: str | None = None  # None: none; "": measure one now (written beside the GGUF); else a file to read
    imatrix_data: str | None = None  # the rows to measure it on (default: ``data``, else the general prompts)

    @property
    def measures_imatrix(self) -> bool:
        return self.imatrix == ""


def _modelfile(opts: ExportOptions) -> Path:
    from hwcompat.export.ollama import modelfile_path

    return modelfile_path(opts.gguf)


def preflight(opts: ExportOptions) -> bool:
    """Every check that needs no GGUF, before anything is written; returns whether to verify. What the user must
    install comes first (a k-quant's or --verify's llama.cpp), then what is in the way (an existing Modelfile), so
    fixing one message never leads to another that was known already."""
    from hwcompat.choices import LLAMA_TYPES

    if opts.qtype in LLAMA_TYPES:
        from hwcompat.export.quantize import binding

        binding(opts.qtype)
    _check_distinct(opts)
    _check_imatrix(opts)
    verify = _verify_wanted(opts)
    if opts.tag:
        from hwcompat.export.ollama import check_tag

        if not opts.ollama:
            raise InputError("--tag names the Ollama model: use it with --ollama")
        check_tag(opts.tag)
    if opts.ollama:
        _check_modelfile_inputs(opts)
    return verify


#: The names an export writes: any other existing file in the model folder is the model's own.
EXPORT_SUFFIXES = (".gguf", ".Modelfile", ".export.json")


def outputs(opts: ExportOptions) -> dict[str, Path]:
    """Every file this export writes, by what it is."""
    out = {"the GGUF": opts.gguf, "the export report": _report(opts.gguf)}
    if opts.measures_imatrix:
        from hwcompat.export.imatrix import path_for

        out["the importance matrix"] = path_for(opts.gguf)
    if opts.ollama:
        out["the Modelfile"] = _modelfile(opts)
    return out


def _check_distinct(opts: ExportOptions, model: Path | None = None) -> None:
    """No file this export writes may be another it writes (``--gguf X.Modelfile --ollama`` would write the GGUF,
    then the Modelfile over it), nor a file of the model it reads: refused before anything is written, with or
    without --overwrite."""
    seen: dict[Path, str] = {}
    for what, path in outputs(opts).items():
        key = Path(path).resolve()
        if key in seen:
            raise InputError(f"--gguf {opts.gguf}: {what} would be written at {path}, where this export also writes "
                             f"{seen[key]}; name the GGUF NAME.gguf (e.g. --gguf {opts.gguf.with_suffix('.gguf')}). "
                             "Nothing was written")
        seen[key] = what
        if model is not None and key.parent == Path(model).resolve() and key.exists() and not key.name.endswith(
                EXPORT_SUFFIXES):
            raise InputError(f"--gguf {opts.gguf}: {what} would replace {path}, a file of the model {model} that "
                             "this export reads; write the GGUF as NAME.gguf or into another folder. Nothing was "
                             "written")


def _check_modelfile_inputs(opts: ExportOptions) -> None:
    from hwcompat.export.ollama import check_gguf_name, check_system
    from hwcompat.sampling import check_temperature

    check_gguf_name(opts.gguf)
    check_system(opts.system)
    check_temperature(opts.temperature)
    target = _modelfile(opts)
    if target.is_dir():
        raise InputError(f"{target} is a folder; the Modelfile is written at that name: move the folder or export "
                         "into another folder (nothing was written)")
    if target.exists() and not opts.overwrite:
        raise InputError(f"{target} already exists; pass --overwrite to replace it (nothing was written)")


def _check_imatrix(opts: ExportOptions) -> None:
    """An importance matrix only where llama.cpp's quantizer runs, from a readable file or usable rows; refused
    before anything is written."""
    from hwcompat.choices import LLAMA_TYPES

    if opts.imatrix is None:
        if opts.imatrix_data:
            raise InputError("--imatrix-data names the rows --imatrix measures on: add --imatrix")
        return
    if opts.qtype not in LLAMA_TYPES:
        raise InputError(f"--imatrix weights llama.cpp's quantizer (--type {', '.join(LLAMA_TYPES)}); --type "
                         f"{opts.qtype} rounds every weight alike, so there is nothing to weight. Nothing was written")
    if not opts.measures_imatrix:
        if opts.imatrix_data:
            raise InputError(f"--imatrix {opts.imatrix} is measured already; --imatrix-data goes with --imatrix "
                             "alone (measure a new one)")
        if not Path(opts.imatrix).is_file():
            raise InputError(f"--imatrix {opts.imatrix}: no such file (nothing was written); without FILE, "
                             "--imatrix measures one on your rows")
        from hwcompat.export.imatrix import read

        read(opts.imatrix)
        return
    rows = opts.imatrix_data or opts.data
    if rows and not Path(rows).is_file():
        raise InputError(f"--imatrix-data {rows}: no such file (nothing was written)")
    if opts.imatrix_data:
        from hwcompat.export.verify import prompts_from

        prompts_from(opts.imatrix_data, 1)  # its rows are checked now, not after the model is loaded
    target = _imatrix_path(opts)
    if target.exists() and not opts.overwrite:
        raise InputError(f"{target} already exists; pass --overwrite to replace it, or reuse it: --imatrix "
                         f"{target} (nothing was written)")


def _imatrix_path(opts: ExportOptions) -> Path:
    from hwcompat.export.imatrix import path_for

    return path_for(opts.gguf)


def importance(model: Path, opts: ExportOptions, say: Say):
    """The importance matrix to quantize with: read (``--imatrix FILE``) or measured on the rows and written beside
    the GGUF (atomic, locked); checked against the model's weights either way. None without ``--imatrix``."""
    if opts.imatrix is None:
        return None
    from hwcompat.export import imatrix as imx
    from hwcompat.export.gguf import weight_shapes

    if not opts.measures_imatrix:
        im = imx.read(opts.imatrix)
        imx.check_sizes(im, weight_shapes(model), f"--imatrix {opts.imatrix}")
        say(f"importance matrix: {opts.imatrix} ({len(im.sums)} weights, {im.tokens} tokens of "
            f"{', '.join(im.datasets)})")
        return im
    from hwcompat.fsutil import output_target, user_mode

    rows, name = imx.calibration(model, opts.imatrix_data or opts.data)
    im = imx.collect(model, rows, name, progress=lambda m: print(m, file=sys.stderr))
    with output_target(_imatrix_path(opts), "hwcompat export", opts.overwrite) as target:
        import tempfile

        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp",
                                         delete=False) as f:
            tmp = Path(f.name)
        try:
            imx.write(tmp, im)
            user_mode(tmp)
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)
    say(f"importance matrix: {len(im.sums)} weights from {im.tokens} tokens of {name} ({len(rows)} rows) -> "
        f"{target}")
    return im


def _verify_wanted(opts: ExportOptions) -> bool:
    have = importlib.util.find_spec("llama_cpp") is not None
    verify = have if opts.verify is None else opts.verify
    if opts.verify_rows < 1:
        raise InputError(f"--verify-rows {opts.verify_rows}: give 1 or more")
    if verify and opts.data and not Path(opts.data).exists():
        raise InputError(f"--data {opts.data}: no such file (nothing was written)")
    if verify and not have:
        from hwcompat.export.quantize import missing

        raise missing(None)  # before the GGUF is written, not after
    if verify and opts.data:
        from hwcompat.export.verify import prompts_from

        prompts_from(opts.data, opts.verify_rows)  # its rows are checked now, not after the GGUF is written
    return verify


def export_model(model: Path, opts: ExportOptions, say: Say = print, on_written: Callable[[Path], None] = lambda p: None
                 ) -> int:
    """GGUF, then (when wanted) verification, then the Modelfile; 0, or 1 when verification failed."""
    from hwcompat.export.gguf import export_gguf

    _check_distinct(opts, model)
    from hwcompat.merge import guard_flags, merged_flags, refuse_flagged

    # a merged folder carries its flags; a full fine-tune's model/ is the run's own output, flagged in its summary
    refuse_flagged(merged_flags(model) or guard_flags(model), f"export {model}", opts.force)
    verify = preflight(opts)
    im = importance(model, opts, say)
    if im is not None and opts.measures_imatrix:
        on_written(_imatrix_path(opts))
    res = export_gguf(model, opts.gguf, opts.qtype, overwrite=opts.overwrite, imatrix=im)
    on_written(res.path)
    weighted = None if im is None else im.summary(_imatrix_path(opts) if opts.measures_imatrix else opts.imatrix)
    say(f"wrote {res.path} ({res.arch}, {res.tensors} tensors, {res.qtype}, pre-tokenizer {res.pre_tokenizer})")
    if res.note:
        say(f"llama.cpp: {res.note} (rows not a multiple of the type's block; see `--verify`)")
    if res.tokenizer == "gpt2" and res.pre_tokenizer == "default":
        say("note: the pre-tokenizer was not recognised; llama.cpp will use its default regex")
    if verify:
        passed = _verified(model, res, opts, say, weighted)
        on_written(_report(res.path))
        if not passed:
            return 1
    else:
        say(_not_verified(res, opts, weighted))
        on_written(_report(res.path))
    if opts.ollama:
        _write_modelfile(model, res.path, opts, say)
        on_written(_modelfile(opts))
    return 0


def _not_verified(res, opts: ExportOptions, imatrix: dict | None = None) -> str:
    """Say that the GGUF was not run in llama.cpp, and write what was checked (the header and tensors written, no
    behaviour) to the same report a verified export writes, so a script finds ``"verified": false``, not nothing."""
    from hwcompat.export.quantize import INSTALL
    from hwcompat.fsutil import atomic_write_json

    why = "--no-verify" if opts.verify is False else f"that needs the extra hwcompat[gguf]: {INSTALL}"
    unused = f"; --data {opts.data} was not used" if opts.data else ""
    atomic_write_json(_report(res.path), {
        "gguf": str(res.path), "qtype": res.qtype, "arch": res.arch, "tensors": res.tensors,
        "pre_tokenizer": res.pre_tokenizer, "tokenizer": res.tokenizer, "quantizer_note": res.note,
        "verified": False, "passed": None, "why_not": why, "data": opts.data, "imatrix": imatrix,
        "checked": ["the model folder (config, tokenizer, architecture) before writing",
                    "every tensor written with its GGUF type and shape"],
        "not_checked": ["tokenization in llama.cpp", "next-token distributions (KL, top-1)", "greedy answers"]})
    return (f"not verified in llama.cpp ({why}){unused}: its tokenization, next-token distributions and greedy "
            f"answers were not compared with the merged model; what was checked: {_report(res.path)}")


def _report(gguf: Path) -> Path:
    from hwcompat.export.verify import report_path

    return Path(report_path(gguf))


def _write_modelfile(model: Path, gguf: Path, opts: ExportOptions, say: Say) -> None:
    from hwcompat.export.ollama import release_commands, write_modelfile

    path, cmd = write_modelfile(gguf, model, opts.temperature, opts.system, overwrite=opts.overwrite, tag=opts.tag)
    say(f"wrote {path}\nrun: {cmd}")
    if opts.tag:
        say(f"then try it (ollama run {opts.tag}), and only when it answers right: "
            f"{release_commands(opts.tag, path)[1]}")


def _verified(model: Path, res, opts: ExportOptions, say: Say, imatrix: dict | None = None) -> bool:
    """Verify the written GGUF; its figures go beside it. False (and the first failure shown) when it fails."""
    from hwcompat.export.verify import next_steps, verify
    from hwcompat.fsutil import atomic_write_json

    verdict = verify(model, res.path, res.qtype, opts.data, opts.verify_rows,
                     progress=lambda m: print(m, file=sys.stderr))
    atomic_write_json(_report(res.path), {**verdict.as_json(), "imatrix": imatrix})
    d, g = verdict.distributions, verdict.generations
    for note in verdict.notes:
        say(f"note: {note}")
    if d:
        t = verdict.tokenization
        shifted = f" (but for a leading space in {t['space_prefix']})" if t.get("space_prefix") else ""
        say(f"verified in llama.cpp: tokenization identical on {t['strings']} strings{shifted}; "
            f"mean KL {d['mean_kl']:.4f}, top-1 {d['top1_agreement']:.1%} over {d['positions']} positions; "
            f"{g['identical']}/{g['prompts']} greedy answers identical")
    for key in g.get("metrics_hf", {}):
        say(f"  {key:14} HF {g['metrics_hf'][key]:.3f}   GGUF {g['metrics_gguf'][key]:.3f}")
    if not verdict.passed:
        print(f"error: --verify failed: {verdict.failures[0]}"
              + (f" (and {len(verdict.failures) - 1} more)" if len(verdict.failures) > 1 else "")
              + f"\nthe GGUF is kept for inspection; figures in {_report(res.path)}. Not writing a Modelfile.",
              file=sys.stderr)
        steps = next_steps(res.qtype, res.path.stat().st_size, opts.verify_rows, opts.data, str(_report(res.path)),
                           weighted=imatrix is not None)
        print("next, in order:\n" + "\n".join(f"  {i}. {s}" for i, s in enumerate(steps, 1)), file=sys.stderr)
        return False
    say(f"wrote {_report(res.path)}")
    return True


def run_export_options(run_dir: Path, cfg) -> ExportOptions:
    """A run's export: its own outputs (replaced freely: the ledger says they are ours), verified on its SFT
    eval rows when llama.cpp is installed."""
    data = cfg.eval_data[0] if cfg.method == Method.sft and cfg.eval_data else None
    weighted = cfg.export_imatrix and cfg.method == Method.sft  # SFT rows: what the model is trained to read
    return ExportOptions(gguf=run_dir / "model.gguf", qtype=cfg.export_type, ollama=True, overwrite=True, data=data,
                         force=cfg.force, imatrix="" if weighted else None,
                         imatrix_data=cfg.train_data[0] if weighted else None)


def export_run(run_dir: Path, cfg, say: Say) -> int:
    """train -> merge -> export in one command: merged/ (safetensors), model.gguf and a Modelfile."""
    from hwcompat.merge import merge
    from hwcompat.train.rundir import EXPORTS, record_written, refuse_foreign

    refuse_foreign(run_dir, EXPORTS)  # checked at the start too; a file may have appeared since
    if cfg.finetune == Finetune.full:  # a whole model already: nothing to merge (export_model asks the guard)
        return export_model(run_dir / "model", run_export_options(run_dir, cfg), say,
                            lambda p: record_written(run_dir, p.name))
    merged = run_dir / "merged"
    shutil.rmtree(merged, ignore_errors=True)  # ours (the ledger says so), from an earlier export
    merge(run_dir / "adapter", cfg.model, merged, log=lambda m: None, allow_flagged=cfg.force)
    record_written(run_dir, "merged")
    say(f"merged: {merged}")
    return export_model(merged, run_export_options(run_dir, cfg), say, lambda p: record_written(run_dir, p.name))
